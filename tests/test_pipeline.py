"""Pipeline files: validation, dependency order, incremental runs, failures."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import make_image

from embedpipe.pipeline import STEP_RECORD, PipelineError, load_pipeline, run_pipeline


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(body))
    return path


BASE = """
[pipeline]
out = "out"

[datasets.imgs]
images = "images"

[[steps]]
kind = "index"
name = "idx"
input = "emb"
metric = "cosine"

[[steps]]
kind = "extract"
name = "emb"
dataset = "imgs"
backbone = "lenet5"
weights = "none"
batch_size = {batch}
workers = 1
"""


def states(run) -> dict[str, str]:
    return {s.step.name: s.state for s in run.statuses}


def test_steps_run_in_dependency_order_and_then_are_skipped(image_folder, tmp_path):
    path = write(tmp_path, BASE.format(batch=4))
    assert [s.name for s in load_pipeline(path).steps] == ["emb", "idx"]
    assert states(run_pipeline(path)) == {"emb": "done", "idx": "done"}
    record = json.loads((tmp_path / "out" / "emb" / STEP_RECORD).read_text())
    assert record["config"]["options"]["backbone"] == "lenet5" and "dataset" in record["inputs"]
    assert states(run_pipeline(path)) == {"emb": "up to date", "idx": "up to date"}
    assert states(run_pipeline(path, dry_run=True)) == {"emb": "up to date", "idx": "up to date"}


def test_a_changed_step_reruns_with_everything_downstream(image_folder, tmp_path):
    run_pipeline(write(tmp_path, BASE.format(batch=4)))
    changed = write(tmp_path, BASE.format(batch=5))
    dry = run_pipeline(changed, dry_run=True)
    assert states(dry) == {"emb": "config changed", "idx": "inputs changed"}
    # the batch size does not change a vector: emb re-runs, finds every image embedded,
    # and leaves its output as it was, so the index built from it stays up to date
    assert states(run_pipeline(changed)) == {"emb": "done", "idx": "up to date"}
    make_image(image_folder / "cats" / "new.png", seed=5)  # new input data
    assert states(run_pipeline(changed, dry_run=True))["emb"] == "inputs changed"
    assert states(run_pipeline(changed)) == {"emb": "done", "idx": "done"}


def test_a_failing_step_stops_the_run_and_keeps_finished_steps(image_folder, tmp_path):
    body = BASE.format(batch=4) + textwrap.dedent("""
        [[steps]]
        kind = "extract"
        name = "broken"
        dataset = "imgs"
        backbone = "resnet18"
        weights = "missing.pth"
    """)
    with pytest.raises(PipelineError, match="step 'broken' \\(extract\\) failed: checkpoint file"):
        run_pipeline(write(tmp_path, body))
    assert (tmp_path / "out" / "emb" / STEP_RECORD).exists()
    assert not (tmp_path / "out" / "broken" / STEP_RECORD).exists()


def test_dry_run_writes_nothing(image_folder, tmp_path):
    run = run_pipeline(write(tmp_path, BASE.format(batch=4)), dry_run=True)
    assert states(run) == {"emb": "new", "idx": "inputs changed"}
    assert not (tmp_path / "out" / "emb").exists()


@pytest.mark.parametrize(
    "body, match",
    [
        ('[pipeline]\nout="o"\n[[steps]]\nkind="train"\nname="x"', r"kind = 'train'; allowed: \['extract', 'finetune'"),
        ('[pipeline]\nout="o"\n[datasets.d]\nimages="i"\n[[steps]]\nkind="extract"\nname="x"\ndataset="d"\nbackbone="a"\nbatchsize=3',
         r"unknown keys \['batchsize'\]; allowed for extract: \[.*'batch_size'"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="extract"\nname="x"\ndataset="nope"\nbackbone="a"', r"dataset = 'nope'; defined datasets: \[\]"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="index"\nname="x"\ninput="y"', r"step 'x' needs unknown steps \['y'\]"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="index"\nname="a"\ninput="b"\n[[steps]]\nkind="index"\nname="b"\ninput="a"', "cycle"),
        ('[pipeline]\nout="o"\n[datasets.d]\nbuiltin="cifar"', r"builtin = 'cifar'; allowed: \['mnist', 'photos'\]"),
        ('[pipline]\nout="o"', r"unknown top-level keys \['pipline'\]"),
        ('[pipeline]\n[[steps]]', "pipeline.out must be a path"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="index"\nname=".."\ninput="a"', r"name = '\.\.': a step name is"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="index"\nname="."\ninput="a"', r"name = '\.': a step name is"),
        ('[pipeline]\nout="o"\n[[steps]]\nkind="index"\nname="a/b"\ninput="a"', r"name = 'a/b'"),
    ],
)
def test_validation_errors_name_the_key_and_the_choices(tmp_path, body, match):
    with pytest.raises(PipelineError, match=match):
        load_pipeline(write(tmp_path, body))


def test_step_keys_follow_the_config_dataclasses(tmp_path):
    """A field added to ExtractConfig/FinetuneConfig/ProbeConfig is a pipeline key at once."""
    from embedpipe.pipeline import _step_keys

    keys = _step_keys()
    assert {"decode_timeout", "max_pixels", "device"} <= keys["extract"][0]
    assert {"momentum", "device"} <= keys["finetune"][0]
    assert {"validation_size", "knn_ks"} <= keys["probe"][0]
    assert {"memory_budget", "target_recall"} <= keys["index"][0]


def test_a_step_folder_is_deleted_only_under_the_output_root(tmp_path):
    from embedpipe.pipeline import _remove_step_output

    root = tmp_path / "out"
    (root / "ft").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    for bad in (root, tmp_path, root / "link", root / "ft" / ".."):
        with pytest.raises(PipelineError, match="refusing to delete"):
            _remove_step_output(bad, root)
    assert root.exists() and (tmp_path / "elsewhere").exists()
    _remove_step_output(root / "ft", root)
    assert not (root / "ft").exists()


def test_available_weights_are_part_of_the_step_key(image_folder, tmp_path, monkeypatch):
    """When cached weights appear, a step with weights = "available" runs again."""
    import embedpipe.pipeline as pipeline_module

    body = BASE.format(batch=4).replace('weights = "none"', 'weights = "available"')
    path = write(tmp_path, body.replace('images = "images"', f'images = "{image_folder}"'))
    run_pipeline(path)
    assert states(run_pipeline(path, dry_run=True))["emb"] == "up to date"
    monkeypatch.setattr(pipeline_module._Runner, "weights", lambda self, step: "/cache/lenet5-new.pt")
    assert states(run_pipeline(path, dry_run=True))["emb"] == "config changed"


def test_shipped_pipelines_are_valid():
    root = Path(__file__).parent.parent / "pipelines"
    files = sorted(root.glob("*.toml"))
    assert {f.name for f in files} >= {"demo.toml", "transfer.toml", "image_search.toml", "finetune.toml"}
    for f in files:
        assert load_pipeline(f).steps


def test_a_step_that_wrote_several_datasets_is_named_step_slash_layer(tmp_path):
    body = """
[pipeline]
out = "o"
[datasets.d]
images = "i"
[[steps]]
kind = "extract"
name = "stages"
dataset = "d"
backbone = "lenet5"
stages = ["stages"]
[[steps]]
kind = "probe"
name = "p"
inputs = ["stages/features.1", "stages/features.4"]
"""
    p = load_pipeline(write(tmp_path, body))
    probe = [s for s in p.steps if s.name == "p"][0]
    assert probe.needs == ("stages",) and p.step_dir("stages/features.1") == p.out / "stages" / "features.1"


@pytest.mark.slow
def test_a_gallery_finds_the_images_behind_an_index_over_one_stage(image_folder, tmp_path):
    """index input "e/gap" (one stage of an extract step): the gallery step must find
    the extract step "e" and its image folder (the demo's shape)."""
    body = f"""
[pipeline]
out = "o"
[datasets.d]
images = "{image_folder}"
[[steps]]
kind = "extract"
name = "e"
dataset = "d"
backbone = "lenet5"
weights = "none"
workers = 1
stages = ["features.1", "gap"]
[[steps]]
kind = "index"
name = "idx"
input = "e/gap"
[[steps]]
kind = "gallery"
name = "g"
index = "idx"
queries = ["cats/000.jpg"]
k = 2
"""
    run = run_pipeline(write(tmp_path, body))
    assert states(run) == {"e": "done", "idx": "done", "g": "done"}
    assert (tmp_path / "o" / "g" / "index.html").is_file()
