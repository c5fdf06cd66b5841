"""What resume bookkeeping costs on huge collections: listing, planning and checking a re-run.

    python benchmarks/scale.py                                   # N = 100k and 1M, the targets' run
    python benchmarks/scale.py --sizes 300,600 --repeats 1       # a smoke run (CI): a minute
    python benchmarks/scale.py --layout shards --sizes 1000000   # 1M images in 100 tar shards

For each N it builds, once and cached under ``--work``, an ImageFolder tree of N images
(10 label folders, subfolders of 1,000 files) made of hard links to a few small real JPEGs
(photographs from scikit-image and scikit-learn at 32-64 px; a new source file every 40,000
links, since ext4 caps the links of one inode at 65,000), and the *finished* dataset that
``embedpipe extract TREE --backbone lenet5 --weights none --out EMB`` would have written for
it: written straight through :class:`~embedpipe.store.DatasetWriter`, with synthetic vectors
but every other column real (each file's size and mtime from the same listing the CLI
uses, width, height and content hash of its source JPEG), and the metadata of a real
extraction. A check compares that writer with a real extraction, column by column.

Then it measures, each in a fresh process, the median of ``--repeats`` runs of

* ``walk``: a bare ``os.walk`` + ``os.stat`` of every file of the tree (its own time,
  interpreter start excluded, and its peak RSS): the floor any listing pays;
* ``no-op``: ``python -m embedpipe -q extract`` again on the finished dataset (wall time,
  peak RSS); it must report ``0 embedded, N already done``;
* ``+1000``: the same after 1,000 new images were linked in a new folder of each label
  (wall time, peak RSS, images/s); the new images and their rows are removed again
  afterwards, so each repeat starts from the same state;

and the process baseline: the no-op re-run of a 100-image dataset (a real extraction),
which pays interpreter start, imports and model building but almost no bookkeeping.

Figures (peak RSS is GNU time's ``%M``, the largest process of the run's tree):

* ``bytes_per_image`` = (no-op RSS at N2 - at N1) / (N2 - N1), the two largest sizes (with
  one size, N1 is the baseline). Target: <= 100.
* ``noop_extra_over_walk`` = (no-op time at N - baseline time - walk time at N) / walk time
  at N, the largest size: what planning costs beyond listing, in walks. Target: <= 3.
* ``marginal_noop_over_walk`` = (no-op at N2 - at N1) / (walk at N2 - at N1): the same
  question asked without the baseline (shown, not judged).

``--layout shards`` lays the same images out as 100 WebDataset tar shards (bytes, not
links; a sample's label in its ``.cls``) and records them finished; the walk then lists
100 files, so its no-op re-run is judged by ``noop_extra_s`` (no-op time over the
baseline's, in seconds; target <= 5: the re-run opens no shard).

At smoke sizes every figure is noise; the targets are judged at 100k and 1M. Run it alone:
on 2 cores any other busy process distorts it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from embedpipe.images.containers import open_containers
from embedpipe.images.samples import photo_folder
from embedpipe.images.sources import open_source
from embedpipe.provenance import identity
from embedpipe.store import (
    MANIFEST,
    DatasetWriter,
    embeddings_table,
    list_parts,
    part_rows_for,
    read_meta,
    sidecar,
    read_parquet,
)

#: GNU time (Debian's package `time`); without it a small Python wrapper reads the rusage
TIME = "/usr/bin/time"
#: the job every run repeats (LeNet-5 needs no download)
EXTRACT = ("--backbone", "lenet5", "--weights", "none")
LINKS_PER_SOURCE = 40_000  # ext4 caps links per inode at 65,000
LABELS = 10
PER_FOLDER = 1_000
BASELINE_IMAGES = 100
SIDES = (32, 40, 48, 56, 64)
#: per layout; shards: a no-op re-run opens no shard, so it is judged in seconds over the
#: baseline (the walk lists a hundred files: a ratio to it says nothing)
TARGETS = {
    "folder": {"bytes_per_image": 100.0, "noop_extra_over_walk": 3.0},
    "shards": {"bytes_per_image": 100.0, "noop_extra_s": 5.0},
}
_DONE = ".complete"

_WALK = """
import json, os, sys, time
t = time.perf_counter()
n = 0
for dirpath, _, names in os.walk(sys.argv[1]):
    for name in names:
        os.stat(os.path.join(dirpath, name))
        n += 1
print(json.dumps({"files": n, "seconds": time.perf_counter() - t}))
"""

_RUSAGE = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(rc)"
)


# --- sources: small real JPEGs, each the target of at most LINKS_PER_SOURCE links ----------


class SourceFiles:
    """Small JPEGs under ``folder``, made on demand from the sample photographs: ``targets(n)``
    gives the file each of ``n`` new links should point to, a new file every
    :data:`LINKS_PER_SOURCE` links. One instance per tree (links of two trees to one inode
    would add up)."""

    def __init__(self, folder: Path, photos: list[Path]) -> None:
        self.folder, self.photos = folder, photos

    def file(self, k: int) -> Path:
        path = self.folder / f"src-{k:04d}.jpg"
        if not path.exists():
            side = SIDES[k % len(SIDES)]
            with Image.open(self.photos[k % len(self.photos)]) as img:
                small = img.convert("RGB").resize((side, side * 3 // 4), Image.Resampling.BILINEAR)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            small.save(tmp, format="JPEG", quality=90)
            os.replace(tmp, path)
        return path

    def targets(self, n: int) -> Iterator[str]:
        for k in range(-(-n // LINKS_PER_SOURCE)):
            target = str(self.file(k))
            for _ in range(min(LINKS_PER_SOURCE, n - k * LINKS_PER_SOURCE)):
                yield target


# --- layouts: how N images are laid out on disk (one class per layout) ---------------------


def _start(root: Path, stamp: str) -> bool:
    """Whether a layout must be (re)built at ``root``: not when it was completed with the
    same ``stamp``; otherwise what is there is cleared first."""
    marker = root / _DONE
    if marker.exists() and marker.read_text() == stamp:
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


class FolderLayout:
    """ImageFolder: ``images/<label>/<sub>/<i>.jpg``, 10 labels, 1,000 files a subfolder.

    ``source`` is what ``embedpipe extract`` is given and what the bare walk lists;
    ``add``/``remove_added`` put ``count`` new images in a new folder of each label and take
    them away again.
    """

    name = "folder"
    ADDED = "added"

    def __init__(self, root: Path, n: int, photos: list[Path]) -> None:
        self.root, self.n = root, n
        self.source = root / "images"
        self.sources = SourceFiles(root / "sources", photos)
        self.added_sources = SourceFiles(root / "sources-added", photos)
        self.files = n  # what the bare walk lists

    def build(self) -> bool:
        """Make the tree unless it is complete already; returns whether it was made."""
        stamp = f"{self.name} n={self.n} {LABELS}x{PER_FOLDER} links={LINKS_PER_SOURCE}"
        if not _start(self.root, stamp):
            return False
        made: set[str] = set()
        for i, target in enumerate(self.sources.targets(self.n)):
            j = i // LABELS
            folder = f"{self.source}/{i % LABELS}/{j // PER_FOLDER:04d}"
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            os.link(target, f"{folder}/{i:07d}.jpg")
        (self.root / _DONE).write_text(stamp)
        return True

    def add(self, count: int) -> None:
        self.remove_added()
        for i, target in enumerate(self.added_sources.targets(count)):
            folder = self.source / str(i % LABELS) / self.ADDED
            folder.mkdir(parents=True, exist_ok=True)
            os.link(target, folder / f"{i:07d}.jpg")

    def remove_added(self) -> None:
        for label in range(LABELS):
            shutil.rmtree(self.source / str(label) / self.ADDED, ignore_errors=True)


class ShardLayout:
    """WebDataset tar shards: ``shards/<k>.tar``, 100 of them, each sample ``<label>/<i>.jpg``
    with its ``.cls``; the bytes of the same small JPEGs as the folder layout. ``add`` writes
    one more shard; the bare walk lists the shards (what a re-run has to look at)."""

    name = "shards"
    SHARDS = 100
    ADDED = "added.tar"

    def __init__(self, root: Path, n: int, photos: list[Path]) -> None:
        self.root, self.n = root, n
        self.source = root / "shards"
        self.sources = SourceFiles(root / "sources", photos)
        self.files = min(self.SHARDS, n)

    def _write(self, path: Path, keys: Iterator[str]) -> None:
        data = [self.sources.file(k).read_bytes() for k in range(len(SIDES))]
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i, key in enumerate(keys):
                label = key.split("/")[0].encode()
                for name, payload in ((f"{key}.jpg", data[i % len(data)]), (f"{key}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        os.replace(tmp, path)

    def build(self) -> bool:
        stamp = f"{self.name} n={self.n} shards={self.files} {LABELS} labels"
        if not _start(self.root, stamp):
            return False
        self.source.mkdir(parents=True)
        per = -(-self.n // self.files)
        for k in range(self.files):
            ids = range(k * per, min(self.n, (k + 1) * per))
            self._write(self.source / f"{k:05d}.tar", (f"{i % LABELS}/{i:07d}" for i in ids))
        (self.root / _DONE).write_text(stamp)
        return True

    def add(self, count: int) -> None:
        self._write(self.source / self.ADDED, (f"{i % LABELS}/added-{i:07d}" for i in range(count)))

    def remove_added(self) -> None:
        (self.source / self.ADDED).unlink(missing_ok=True)


LAYOUTS = {FolderLayout.name: FolderLayout, ShardLayout.name: ShardLayout}


# --- the finished dataset ------------------------------------------------------------------


def write_dataset(source: Path, out: Path, meta: dict, seed: int = 0) -> None:
    """The dataset a finished extraction of ``source`` holds, with synthetic vectors.

    Rows come from the listing the CLI itself makes (:func:`~embedpipe.images.sources.open_source`,
    or the shards' records from :func:`~embedpipe.images.containers.open_containers`), so
    ids, labels, sizes and mtimes agree; width, height and content hash are those of each
    image's bytes, computed once per distinct image; shards are recorded complete.
    """
    containers = open_containers(source)
    if containers is None:
        records = open_source(source)
    else:
        records = [r for c in containers for r in c.records()]
    dim, dtype = int(meta["dim"]), meta.get("embedding_dtype", "float32")
    looks: dict[object, tuple[int, int, str]] = {}

    def look(r) -> tuple[int, int, str]:
        key = r.data if r.data is not None else (os.stat(r.path).st_dev, os.stat(r.path).st_ino)
        if key not in looks:
            data = r.data if r.data is not None else Path(r.path).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                looks[key] = (*img.size, hashlib.blake2b(data, digest_size=16).hexdigest())
        return looks[key]

    rng = np.random.default_rng(seed)
    chunk = part_rows_for(dim, np.dtype(dtype).itemsize)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".embedpipe"), ignore_errors=True)  # its bookkeeping
    with DatasetWriter(out, meta) as w:
        for start in range(0, len(records), chunk):
            rows = records[start : start + chunk]
            width, height, digest = zip(*(look(r) for r in rows))
            w.append(embeddings_table(
                ids=[r.id for r in rows], labels=[r.label for r in rows],
                vectors=rng.standard_normal((len(rows), dim), dtype=np.float32).astype(dtype),
                width=width, height=height, size=[r.size for r in rows],
                mtime_ns=[r.mtime_ns for r in rows], content_hash=digest, schema=w.schema,
            ))
        for c in containers or ():
            w.record_container(c.name, c.size, c.mtime_ns, complete=True)


def snapshot(out: Path) -> dict[str, list[int]]:
    """Every data file of a dataset -> [size, mtime_ns] (the lock and the manifest, which
    each run rewrites, left out)."""
    return {
        p.relative_to(out).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in ("_lock", MANIFEST)
    }


class Finished:
    """The finished dataset of a layout, cached: built when missing or made differently,
    and put back after a run that added rows."""

    def __init__(self, layout: FolderLayout, meta: dict) -> None:
        self.layout, self.meta = layout, meta
        self.out = layout.root / "emb"
        self.stamp = layout.root / "emb.json"

    def ensure(self) -> bool:
        """Build the dataset unless the cached one is intact; returns whether it was built."""
        want = identity(self.meta)
        if self.stamp.exists():
            saved = json.loads(self.stamp.read_text())
            same = saved["identity"] == json.loads(json.dumps(want))
            if same and saved["files"] == snapshot(self.out):
                return False
        self.stamp.unlink(missing_ok=True)
        images = str(self.layout.source.absolute())
        write_dataset(self.layout.source, self.out, {**self.meta, "images": images})
        log = sidecar(self.out) / "containers.jsonl"
        self.stamp.write_text(json.dumps({"identity": want, "files": snapshot(self.out),
                                          "containers": log.read_text() if log.exists() else None}))
        return True

    def restore(self) -> bool:
        """Remove the added images and the rows a run wrote for them (files the cached
        state lacks); anything else changed, or no cached state, means a (re)build.
        Returns whether the dataset was built."""
        self.layout.remove_added()
        stamp = json.loads(self.stamp.read_text()) if self.stamp.exists() else {}
        saved = stamp.get("files", {})
        for rel in snapshot(self.out).keys() - saved.keys() if saved else ():
            (self.out / rel).unlink()
        if stamp.get("containers"):  # the shards as finished, without the added one
            (sidecar(self.out) / "containers.jsonl").write_text(stamp["containers"])
        return self.ensure()


# --- measuring -----------------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    rss_mib: float
    stdout: str


def measure(argv: list[str]) -> Run:
    """One run of ``argv`` as a fresh program: wall seconds, peak RSS, stdout.

    The RSS comes from GNU time (or a small wrapper): a child forked from this Python would
    count this process's own pages, resident at the fork, in its peak.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        prefix = ([TIME, "-f", "%M", "-o", report.name] if os.access(TIME, os.X_OK)
                  else [sys.executable, "-c", _RUSAGE, report.name])
        t = time.perf_counter()
        r = subprocess.run([*prefix, *argv], capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return Run(wall, int(report.read().split()[-1]) / 1024, r.stdout)  # KiB


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedpipe", "-q", *args]


_SUMMARY = re.compile(
    r"(\d+) embedded, (\d+) already done, (\d+) errors.*, (\d+) dropped.*; ([\d.]+) images/s"
)


def summary(stdout: str) -> dict:
    """The counts of an ``extract`` summary line."""
    m = _SUMMARY.search(stdout)
    if m is None:
        raise SystemExit(f"no extract summary in the output: {stdout[-500:]!r}")
    keys = ("embedded", "skipped", "errors", "dropped")
    return {**dict(zip(keys, map(int, m.groups()[:4]))), "images_per_s": float(m.group(5))}


def rerun(layout: FolderLayout, out: Path, n: int, added: int = 0) -> tuple[Run, dict]:
    """``extract`` again on a finished dataset; checks it embedded exactly the new images."""
    run = measure(cli("extract", str(layout.source), *EXTRACT, "--out", str(out)))
    s = summary(run.stdout)
    if (s["embedded"], s["skipped"], s["errors"], s["dropped"]) != (added, n, 0, 0):
        raise SystemExit(f"the re-run of {out} was not the expected {added} embedded, {n} already "
                         f"done: {run.stdout.strip()}")
    return run, s


def walk(layout: FolderLayout, n: int) -> Run:
    """The bare walk; ``wall_s`` is its own time (the interpreter's start left out)."""
    run = measure([sys.executable, "-c", _WALK, str(layout.source)])
    done = json.loads(run.stdout)
    if done["files"] != layout.files:
        raise SystemExit(f"the walk of {layout.source} found {done['files']} files, not {layout.files}")
    return Run(done["seconds"], run.rss_mib, run.stdout)


def median(values) -> float:
    return float(statistics.median(values))


# --- the benchmark -------------------------------------------------------------------------


def baseline(layout: FolderLayout, repeats: int) -> tuple[dict, dict]:
    """A real extraction of the small tree (its metadata is what every synthetic dataset
    records), the check that :func:`write_dataset` writes what extraction writes, and the
    no-op re-run's time and RSS: ``(meta, figures)``."""
    layout.build()
    out = layout.root / "emb"
    shutil.rmtree(out, ignore_errors=True)
    extraction = measure(cli("extract", str(layout.source), *EXTRACT, "--out", str(out)))
    extracted = summary(extraction.stdout)
    if extracted["embedded"] != layout.n:
        raise SystemExit(f"the extraction of {layout.source} did not embed all {layout.n} images")
    meta = {k: v for k, v in read_meta(out).items() if k != "part"}
    check = layout.root / "emb-synthetic"
    write_dataset(layout.source, check, meta)
    real, synthetic = (
        read_parquet(list_parts(p)[0]).drop_columns(["embedding"]).replace_schema_metadata(None)
        for p in (out, check)
    )
    if len(list_parts(check)) != 1 or not real.sort_by("id").equals(synthetic.sort_by("id")):
        raise SystemExit("the synthetic dataset differs from a real extraction's (bar the vectors)")
    runs = [rerun(layout, out, layout.n)[0] for _ in range(repeats)]
    return meta, {"images": layout.n, "noop_s": median(r.wall_s for r in runs),
                  "noop_rss_mib": median(r.rss_mib for r in runs)}


def one_size(layout: FolderLayout, meta: dict, repeats: int, added: int) -> dict:
    n = layout.n
    t = time.perf_counter()
    built = layout.build()
    finished = Finished(layout, meta)
    if finished.restore() or built:  # restore: what a killed run left, too
        what = "the tree and the dataset" if built else "the dataset"
        print(f"  built {what} in {time.perf_counter() - t:.1f} s")
    walk(layout, n)  # warm the dentry and inode caches (the tree may have been built long ago)
    walks, noops, adds, add_summaries = [], [], [], []
    for _ in range(repeats):
        walks.append(walk(layout, n))
        noop_run, noop = rerun(layout, finished.out, n)
        noops.append(noop_run)
        layout.add(added)
        try:
            add_run, add_summary = rerun(layout, finished.out, n, added)
        finally:
            if finished.restore():
                print("  (the re-run changed more than it added: the dataset was rebuilt)")
        adds.append(add_run)
        add_summaries.append(add_summary)
    return {
        "images": n,
        "walk_s": median(r.wall_s for r in walks),
        "walk_rss_mib": median(r.rss_mib for r in walks),
        "noop_s": median(r.wall_s for r in noops),
        "noop_rss_mib": median(r.rss_mib for r in noops),
        "noop_embedded": noop["embedded"],  # rerun() checked: 0 embedded, n already done
        "noop_skipped": noop["skipped"],
        "added_s": median(r.wall_s for r in adds),
        "added_rss_mib": median(r.rss_mib for r in adds),
        "added_images_per_s": median(s["images_per_s"] for s in add_summaries),
        "added_embedded": add_summaries[-1]["embedded"],
    }


def derive(rows: list[dict], base: dict) -> dict:
    """The figures of the docstring from the per-size rows (sorted by size)."""
    mib = 2**20
    for r in rows:
        r["noop_extra_s"] = r["noop_s"] - base["noop_s"] - r["walk_s"]
        r["noop_extra_over_walk"] = r["noop_extra_s"] / r["walk_s"]
        above = r["noop_rss_mib"] - base["noop_rss_mib"]
        r["bytes_per_image_above_baseline"] = above * mib / r["images"]
    a, b = rows[-2] if len(rows) > 1 else {**base, "walk_s": 0.0}, rows[-1]
    grew = {k: b[k] - a[k] for k in ("images", "walk_s", "noop_s", "noop_rss_mib")}
    return {
        "between": [a["images"], b["images"]],
        "bytes_per_image": grew["noop_rss_mib"] * mib / grew["images"],
        "noop_extra_over_walk": b["noop_extra_over_walk"],
        "noop_extra_s": b["noop_extra_s"],
        # None when the walk did not get slower (smoke sizes: its time is all noise)
        "marginal_noop_over_walk": grew["noop_s"] / grew["walk_s"] if grew["walk_s"] > 0 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="Comma-separated image counts.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--added", type=int, default=1000, help="New images of the incremental re-run.")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default=FolderLayout.name)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "embedpipe-scale",
                    help="Trees and datasets, kept between runs.")
    ap.add_argument("--out", type=Path, help="Also write the figures here (JSON).")
    args = ap.parse_args()
    sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] <= BASELINE_IMAGES:
        raise SystemExit(f"--sizes must all exceed {BASELINE_IMAGES} (the baseline): {args.sizes!r}")
    t0 = time.perf_counter()
    photos = sorted(photo_folder(args.work / "photos").glob("*.jpg"))
    layout = LAYOUTS[args.layout]
    print(f"baseline: {BASELINE_IMAGES} images, real extraction", flush=True)
    small = layout(args.work / f"{args.layout}-baseline", BASELINE_IMAGES, photos)
    meta, base = baseline(small, args.repeats)
    rows = []
    for n in sizes:
        print(f"{n:,} images", flush=True)
        big = layout(args.work / f"{args.layout}-{n}", n, photos)
        rows.append(one_size(big, meta, args.repeats, args.added))
    derived = derive(rows, base)
    targets = {k: {"value": derived[k], "limit": limit, "pass": derived[k] <= limit}
               for k, limit in TARGETS[args.layout].items()}
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "layout": args.layout, "repeats": args.repeats, "added": args.added,
        "links_per_source": LINKS_PER_SOURCE, "extract": " ".join(EXTRACT),
        "baseline": base, "sizes": rows, "derived": derived, "targets": targets,
        "note": "smoke sizes: the figures are noise; the targets are judged at 100k and 1M"
        if sizes[-1] < 100_000 else "",
        "seconds": time.perf_counter() - t0,
    }
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    base = report["baseline"]
    print(f"\n{report['layout']} layout, median of {report['repeats']}; baseline no-op re-run of "
          f"{base['images']} images: {base['noop_s']:.2f} s, {base['noop_rss_mib']:.0f} MiB")
    added = f"+{report['added']} s"
    print(f"{'images':>10} {'walk s':>8} {'walk MiB':>9} {'no-op s':>8} {'no-op MiB':>10} "
          f"{'extra/walk':>10} {'B/img':>7} {added:>8} {'img/s':>7}")
    for r in report["sizes"]:
        print(f"{r['images']:>10,} {r['walk_s']:>8.3f} {r['walk_rss_mib']:>9.1f} "
              f"{r['noop_s']:>8.2f} {r['noop_rss_mib']:>10.1f} {r['noop_extra_over_walk']:>10.1f} "
              f"{r['bytes_per_image_above_baseline']:>7.0f} {r['added_s']:>8.2f} "
              f"{r['added_images_per_s']:>7.1f}")
    print("(extra/walk: (no-op - baseline - walk) / walk; B/img: no-op RSS above the baseline's, "
          "per image)")
    d = report["derived"]
    if d["marginal_noop_over_walk"] is not None:
        print(f"between {d['between'][0]:,} and {d['between'][1]:,} images the no-op re-run's time "
              f"grows {d['marginal_noop_over_walk']:.1f}x as fast as the walk's")
    for name, t in report["targets"].items():
        verdict = "pass" if t["pass"] else "FAIL"
        print(f"  {name:<22} {t['value']:>8.1f}  target <= {t['limit']:g}  {verdict}")
    if report["note"]:
        print(f"  ({report['note']})")
    print(f"total {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
