"""Declarative pipelines: one TOML file says which images, which steps; one command runs
them, skips what is up to date and leaves a report.

A pipeline file (read with the standard library's ``tomllib``; nothing in it is
executed) has an output root, named datasets and named steps::

    [pipeline]
    out = "runs/transfer"                  # relative to the file

    [datasets.photos]
    images = "data/photos"                 # a folder or a CSV/Parquet manifest
    [datasets.digits]
    builtin = "mnist"                      # real images that ship with a package
    digits = [5, 6, 7, 8, 9]
    per_class = 100

    [[steps]]
    kind = "extract"                       # extract | finetune | index | probe | gallery
    name = "r18"
    dataset = "photos"
    backbone = "resnet18"
    weights = "DEFAULT"                    # or "none", a file, "step:<finetune step>", or
                                           # "available" (cached pretrained, else none)

A step's options are those of the matching command. Inputs name other steps
(``weights = "step:NAME"``, ``input``, ``inputs``, ``index``), which orders the run.

Each step records in its output folder (``_step.json``) the configuration and input
fingerprints it was made from. A step whose record matches is skipped; a changed one
re-runs, and so does everything downstream, whose input fingerprints then change. A
failing step stops the pipeline with its error; finished steps stay as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Choice, ExtractConfig, FinetuneConfig
from .errors import PipelineError
from .files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

STEP_RECORD = "_step.json"


# --- the file ------------------------------------------------------------------------

BUILTIN_DATASETS = ("mnist", "photos")
_DATASET_KEYS = {"images", "builtin", "digits", "per_class"}

def _fields(config: type, *, without: set[str]) -> set[str]:
    return {f.name for f in dataclasses.fields(config)} - without


def _step_keys() -> dict[str, tuple[set[str], set[str]]]:
    """Step kind -> (allowed option keys, keys that name other steps): the fields of each
    step's config, so that a new option is a pipeline key the day it exists."""
    from .index import Index
    from .probe import ProbeConfig

    build = inspect.signature(Index.build).parameters
    index_options = {n for n, p in build.items() if p.kind is p.KEYWORD_ONLY} - {
        "meta", "embeddings_path", "shards", "lists_dir"} | {"on_disk"}  # the step places the lists
    return {
        "extract": (_fields(ExtractConfig, without={"source", "out", "overwrite"}) | {"dataset"}, set()),
        "finetune": (_fields(FinetuneConfig, without={"source", "out"}) | {"dataset"}, set()),
        "index": (index_options | {"input"}, {"input"}),
        "probe": (_fields(ProbeConfig, without=set()) | {"inputs"}, {"inputs"}),
        "gallery": ({"index", "queries", "k"}, {"index"}),
    }


_COMMON = {"kind", "name"}
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Step:
    kind: str
    name: str
    options: dict[str, Any]
    needs: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    path: Path
    out: Path
    datasets: dict[str, dict[str, Any]]
    steps: tuple[Step, ...]

    def step_dir(self, name: str) -> Path:
        return self.out / name


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file; errors name the key and the allowed values."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise PipelineError(f"cannot read pipeline {path}: {e}") from e
    base = path.parent
    unknown = set(doc) - {"pipeline", "datasets", "steps"}
    if unknown:
        raise PipelineError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: pipeline, datasets, steps")
    out = doc.get("pipeline", {}).get("out")
    if not isinstance(out, str):
        raise PipelineError(f"{_where(path, 'pipeline.out')} must be a path (the output root)")
    datasets = {}
    for name, d in doc.get("datasets", {}).items():
        extra = set(d) - _DATASET_KEYS
        if extra:
            raise PipelineError(f"{_where(path, f'datasets.{name}')}: unknown keys {sorted(extra)}; allowed: {sorted(_DATASET_KEYS)}")
        if ("images" in d) == ("builtin" in d):
            raise PipelineError(f"{_where(path, f'datasets.{name}')} needs exactly one of 'images' or 'builtin'")
        if "builtin" in d and d["builtin"] not in BUILTIN_DATASETS:
            raise PipelineError(f"{_where(path, f'datasets.{name}.builtin')} = {d['builtin']!r}; allowed: {list(BUILTIN_DATASETS)}")
        datasets[name] = {**d, **({"images": str((base / d["images"]).resolve())} if "images" in d else {})}
    steps: list[Step] = []
    step_keys = _step_keys()
    for i, s in enumerate(doc.get("steps", [])):
        where = _where(path, f"steps[{i}]")
        kind, name = s.get("kind"), s.get("name")
        if kind not in step_keys:
            raise PipelineError(f"{where}.kind = {kind!r}; allowed: {sorted(step_keys)}")
        if not isinstance(name, str) or not _STEP_NAME.fullmatch(name) or name in (".", ".."):
            raise PipelineError(
                f"{where}.name = {name!r}: a step name is letters, digits, '_', '-' and '.', "
                "starting with a letter or digit (it names the step's output folder)"
            )
        allowed, refs = step_keys[kind]
        extra = set(s) - allowed - _COMMON
        if extra:
            raise PipelineError(f"{where} ({name}): unknown keys {sorted(extra)}; allowed for {kind}: {sorted(allowed)}")
        options = {k: v for k, v in s.items() if k not in _COMMON}
        if "dataset" in allowed:
            if options.get("dataset") not in datasets:
                raise PipelineError(f"{where}.dataset = {options.get('dataset')!r}; defined datasets: {sorted(datasets)}")
            if "backbone" not in options:
                raise PipelineError(f"{where} ({name}) needs a backbone")
        needs = []
        for key in refs:
            value = options.get(key)
            names = value if isinstance(value, list) else [value]
            if value is None or not all(isinstance(v, str) for v in names):
                raise PipelineError(f"{where}.{key} must name {'steps' if key == 'inputs' else 'a step'}")
            # "step/layer" names one dataset of a step that wrote several (--layer stages)
            needs += list(dict.fromkeys(n.split("/", 1)[0] for n in names))
        weights = str(options.get("weights", ""))
        if weights.startswith("step:"):
            needs.append(weights.removeprefix("step:"))
        elif weights and kind in ("extract", "finetune") and weights.lower() not in ("none", "default") \
                and ("/" in weights or weights.endswith((".pt", ".pth", ".safetensors"))):
            options["weights"] = str((base / weights).resolve())
        steps.append(Step(kind, name, options, tuple(needs)))
    names = [s.name for s in steps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PipelineError(f"{path}: step names must be unique; repeated: {sorted(dup)}")
    for s in steps:
        missing = [n for n in s.needs if n not in names]
        if missing:
            raise PipelineError(f"{path}: step {s.name!r} needs unknown steps {missing}; steps: {names}")
    return Pipeline(path, (base / out).resolve(), datasets, tuple(_ordered(steps)))


def _ordered(steps: list[Step]) -> list[Step]:
    """Steps in dependency order (file order where free); a cycle is an error."""
    done: list[Step] = []
    pending = list(steps)
    while pending:
        ready = [s for s in pending if all(n in {d.name for d in done} for n in s.needs)]
        if not ready:
            raise PipelineError(f"steps depend on each other in a cycle: {[s.name for s in pending]}")
        done.append(ready[0])
        pending.remove(ready[0])
    return done


# --- fingerprints and records ---------------------------------------------------------


def fingerprint(path: Path) -> str:
    """A hash of a file's or folder's contents as seen by (name, size, mtime)."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        if p.name in (STEP_RECORD, "_lock") or p.name.startswith("."):
            continue
        st = p.stat()
        h.update(f"{p.relative_to(path) if p != path else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _key(config: dict, inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps({"config": config, "inputs": inputs}, sort_keys=True).encode()).hexdigest()


class StepState(Choice):
    """Where a step stands: before a run (the first four) or after it."""

    UP_TO_DATE = "up to date"
    NEW = "new"
    CONFIG_CHANGED = "config changed"
    INPUTS_CHANGED = "inputs changed"
    DONE = "done"
    FAILED = "failed"


@dataclass
class StepStatus:
    step: Step
    state: StepState
    detail: str = ""


@dataclass
class PipelineRun:
    statuses: list[StepStatus] = field(default_factory=list)


# --- running -------------------------------------------------------------------------


class _Runner:
    def __init__(self, pipeline: Pipeline, progress: bool) -> None:
        self.p = pipeline
        self.progress = progress

    def dataset_path(self, name: str) -> Path:
        from .images.samples import mnist_folder, photo_folder

        d = self.p.datasets[name]
        if "images" in d:
            return Path(d["images"])
        root = self.p.out / "_datasets" / name
        if d["builtin"] == "mnist":
            return mnist_folder(root, per_class=d.get("per_class"), digits=d.get("digits", range(10)))
        return photo_folder(root)

    def inputs(self, step: Step) -> dict[str, str]:
        """Fingerprints of everything the step reads."""
        fp = {n: fingerprint(self.p.step_dir(n)) for n in step.needs}
        if "dataset" in step.options:
            fp["dataset"] = fingerprint(self.dataset_path(step.options["dataset"]))
        return fp

    def weights(self, step: Step) -> str:
        """``step:NAME`` -> that fine-tuning step's checkpoint; ``available`` -> the first
        pretrained weights already on this machine, else ``none`` (recorded as such)."""
        from .backbones import available_weights, get_spec

        w = str(step.options.get("weights", "DEFAULT"))
        if w.startswith("step:"):
            return str(self.p.step_dir(w.removeprefix("step:")) / "checkpoint.pt")
        if w.lower() == "available":
            return next(iter(available_weights(get_spec(step.options["backbone"]))), "none")
        return w

    # one method per step kind: options in, files out under the step's folder

    def extract(self, step: Step, out: Path) -> str:
        from .extraction import extract

        o = {k: v for k, v in step.options.items() if k != "dataset"}
        o["weights"] = self.weights(step)
        # same metadata: resumes and updates; changed settings: replaces (the step's record
        # already says the old output is stale)
        s = extract(ExtractConfig(source=self.dataset_path(step.options["dataset"]), out=out, overwrite=True, **o),
                    progress=self.progress)
        return s.line()

    def finetune(self, step: Step, out: Path) -> str:
        from .finetune import finetune

        o = {k: v for k, v in step.options.items() if k != "dataset"}
        o["weights"] = self.weights(step)
        if "unfreeze" in o:
            o["unfreeze"] = tuple(o["unfreeze"])
        r = finetune(FinetuneConfig(source=self.dataset_path(step.options["dataset"]), out=out, **o),
                     progress=self.progress)
        return f"best epoch {r.best_epoch}, validation {r.best_val_accuracy:.3f}, test {r.test_accuracy:.3f}"

    def index(self, step: Step, out: Path) -> str:
        from .errors import MetadataMismatchError
        from .index import META_FILE, Index, embedding_blocks, update_embeddings
        from .index.ondisk import lists_beside
        from .store import read_meta

        src = self.p.step_dir(step.options["input"])
        record = out / STEP_RECORD
        same_config = record.is_file() and json.loads(record.read_text()).get("config") == {
            "kind": step.kind, "options": step.options}
        on_disk = bool(step.options.get("on_disk"))
        if same_config and (out / META_FILE).is_file() and not on_disk:  # on-disk lists: rebuilt
            # only the rows changed: update the index in place of a rebuild, unless the
            # embeddings were made differently or the update says the training has drifted
            try:
                idx, r = update_embeddings(out, src)
            except MetadataMismatchError as e:
                log.info("rebuilding index %s: %s", step.name, e)
            else:
                if not r.rebuild_advised:
                    return (f"{idx.info.factory} updated: {r.added} added, {r.removed} removed, "
                            f"{r.replaced} replaced -> {len(idx)} vectors")
                log.info("rebuilding index %s: recall@%d %.3f after the update", step.name, r.k, r.recall)
        o = {k: v for k, v in step.options.items() if k not in ("input", "on_disk")}
        with lists_beside(out, on_disk) as lists_dir:  # as index build --on-disk
            idx = Index.build(embedding_blocks(src), meta=read_meta(src), embeddings_path=src,
                              lists_dir=lists_dir, **o)
            idx.save(out, overwrite=True)
        return f"{idx.info.factory} over {len(idx)} vectors"

    def probe(self, step: Step, out: Path) -> str:
        from .probe import ProbeConfig, ProbeInput, run_probe
        from .report import write_report
        from .store import read_embeddings

        inputs = [ProbeInput.from_embeddings(read_embeddings(self.p.step_dir(n)), name=n)
                  for n in step.options["inputs"]]
        o = {k: v for k, v in step.options.items() if k != "inputs"}
        files = write_report(run_probe(inputs, ProbeConfig(**o)), out)
        return f"report: {files.html}"

    def gallery(self, step: Step, out: Path) -> str:
        from .gallery import gallery_page, query_galleries
        from .index import Index
        from .provenance import Provenance

        idx = Index.open(self.p.step_dir(step.options["index"]))
        images = Path(self.dataset_root_of(step.options["index"]))
        k = int(step.options.get("k", 8))
        queries = step.options.get("queries", [])
        results = idx.search_ids(queries, k=k, exclude_self=True).to_frame() if queries else None
        provenance = Provenance.from_json(idx.meta)
        galleries = query_galleries(
            results, {q: images / q for q in queries}, images, provenance=provenance, k=k,
            score_name=str(idx.info.metric), query_labels={q: idx.label_of(q) for q in queries},
        ) if queries else []
        for g in galleries:
            atomic_write_bytes(g.png, out / Path(g.query_id.replace("/", "_")).with_suffix(".png").name)
        atomic_write_text(gallery_page(galleries, provenance=provenance), out / "index.html")
        return f"{len(galleries)} galleries -> {out / 'index.html'}"

    def dataset_root_of(self, index_step: str) -> str:
        """The image folder behind an index: its input extract step's dataset."""
        by_name = {s.name: s for s in self.p.steps}
        # the step the index reads ("lite0" for the input "lite0/gap"), as parsing resolved it
        extract_step = by_name[by_name[index_step].needs[0]]
        return str(self.dataset_path(extract_step.options["dataset"]))


def _remove_step_output(out: Path, root: Path) -> None:
    """Delete a step's output folder, and nothing else: ``out`` must be a folder directly
    under the pipeline's output root (never the root, its parent, or a link out of it)."""
    root = root.resolve()
    if out.is_symlink() or out.resolve().parent != root:
        raise PipelineError(f"refusing to delete {out}: it is not a step folder directly under {root}")
    shutil.rmtree(out)
    from .store import sidecar  # pyarrow: not needed to plan a run

    bookkeeping = sidecar(out)  # an extract step's errors and journal, beside its output
    if bookkeeping.is_dir() and not bookkeeping.is_symlink():
        shutil.rmtree(bookkeeping)


def run_pipeline(
    path: str | os.PathLike, *, dry_run: bool = False, progress: bool = False,
    on_status: Callable[[StepStatus], None] | None = None,
) -> PipelineRun:
    """Run the pipeline at ``path``: each step that is not up to date, in order.

    ``dry_run`` only reports what would run. ``on_status`` hears about each step as it
    is decided and finished (the CLI prints these).
    """
    pipeline = load_pipeline(path)
    runner = _Runner(pipeline, progress)
    run = PipelineRun()
    changed: set[str] = set()
    for step in pipeline.steps:
        out = pipeline.step_dir(step.name)
        config = {"kind": step.kind, "options": step.options}
        if str(step.options.get("weights", "")).lower() == "available":
            # what "available" means changes when weights reach the cache: part of the key
            config["weights_resolved"] = runner.weights(step)
        if dry_run and any(n in changed for n in step.needs):
            status = StepStatus(step, StepState.INPUTS_CHANGED, "an upstream step would run")
        else:
            inputs = runner.inputs(step)
            record = out / STEP_RECORD
            old = json.loads(record.read_text()) if record.exists() else None
            key = _key(config, inputs)
            if old is None:
                state = StepState.NEW
            elif old.get("key") == key:
                state = StepState.UP_TO_DATE
            elif old.get("config") != config:
                state = StepState.CONFIG_CHANGED
            else:
                state = StepState.INPUTS_CHANGED
            status = StepStatus(step, state)
        if status.state != StepState.UP_TO_DATE:
            changed.add(step.name)
        if dry_run or status.state == StepState.UP_TO_DATE:
            run.statuses.append(status)
            if on_status:
                on_status(status)
            continue
        if on_status:
            on_status(status)
        if status.state == StepState.CONFIG_CHANGED and step.kind == "finetune":
            _remove_step_output(out, pipeline.out)  # other settings cannot resume, only replace
        try:
            detail = getattr(runner, step.kind)(step, out)
        except Exception as e:
            failed = StepStatus(step, StepState.FAILED, f"{type(e).__name__}: {e}")
            run.statuses.append(failed)
            if on_status:
                on_status(failed)
            raise PipelineError(f"step {step.name!r} ({step.kind}) failed: {e}") from e
        # record only after success, with the inputs as they were read
        atomic_write_text(json.dumps({"key": key, "config": config, "inputs": inputs}, indent=2), out / STEP_RECORD)
        done = StepStatus(step, StepState.DONE, detail)
        run.statuses.append(done)
        if on_status:
            on_status(done)
    return run
