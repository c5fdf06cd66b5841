"""The Ray Data engine against the local engine: same dataset, same guarantees.

One local Ray instance (2 CPUs) serves the whole module; the engine uses an instance
it finds running and leaves it be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from conftest import make_image, require
from PIL import Image

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.errors import MetadataMismatchError, MissingDependencyError, TooManyErrorsError
from embedpipe.extraction import local as engine
from embedpipe.store import identity, read_embeddings, read_errors, sidecar

ray = require("ray", "the Ray engine: pip install -e '.[ray]'")

pytestmark = pytest.mark.ray

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    flag = tmp_path_factory.mktemp("flags") / "died"
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {
            # the workers import the user backbones of tests/ and see where to mark a death
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "EMBEDPIPE_TEST_DIE_FLAG": str(flag),
        }},
    )
    os.environ["EMBEDPIPE_TEST_DIE_FLAG"] = str(flag)  # for the local engine's reference run
    yield flag
    ray.shutdown()


def _run_ray(**options):
    from embedpipe.extraction import ray as ray_engine

    return ray_engine.extract(ExtractConfig(engine="ray", **options))


def _by_id(e):
    order = np.argsort(e.ids)
    return [e.ids[i] for i in order], [e.labels[i] for i in order], e.vectors[order]


@pytest.fixture
def messy_folder(image_folder: Path) -> Path:
    """The two-class folder plus files that cannot be embedded, and a red image."""
    (image_folder / "cats" / "notes.jpg").write_text("not an image")
    (image_folder / "dogs" / "empty.png").write_bytes(b"")
    data = (image_folder / "cats" / "000.jpg").read_bytes()
    (image_folder / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (50, 40), (255, 0, 0)).save(image_folder / "dogs" / "red.png")
    return image_folder


def test_ray_dataset_equals_the_local_engines(ray_instance, messy_folder, tmp_path):
    torch.manual_seed(7)
    ckpt = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    options = dict(source=messy_folder, backbone="resnet18", weights=str(ckpt), resize_size=72,
                   crop_size=64, batch_size=4)
    local = engine.extract(ExtractConfig(out=tmp_path / "local", workers=1, **options))
    remote = _run_ray(out=tmp_path / "ray", **options)

    assert (remote.embedded, remote.errors) == (local.embedded, local.errors) == (11, 3)
    assert remote.errors_by_type == local.errors_by_type
    a, b = read_embeddings(tmp_path / "local"), read_embeddings(tmp_path / "ray")
    ids_a, labels_a, x_a = _by_id(a)
    ids_b, labels_b, x_b = _by_id(b)
    assert ids_b == ids_a and labels_b == labels_a
    np.testing.assert_allclose(x_b, x_a, rtol=1e-4, atol=1e-5)
    assert identity(b.meta) == identity(a.meta)
    assert b.meta["weights"]["kind"] == "checkpoint" and b.meta["runtime"]["engine"] == "ray"
    ea, eb = (read_errors(tmp_path / d).sort_values("id").reset_index(drop=True) for d in ("local", "ray"))
    assert eb[["id", "error_type", "size"]].equals(ea[["id", "error_type", "size"]])


def test_a_model_actor_killed_mid_run_still_yields_the_complete_dataset(ray_instance, messy_folder, tmp_path):
    assert not ray_instance.exists()
    options = dict(source=messy_folder, backbone="userbackbone:build_dies_once", weights="none", batch_size=2)
    s = _run_ray(out=tmp_path / "ray", **options)
    assert ray_instance.exists(), "the actor did not die: the test tested nothing"
    assert (s.embedded, s.errors) == (11, 3)
    engine.extract(ExtractConfig(out=tmp_path / "local", workers=1, **options))
    ids_a, _, x_a = _by_id(read_embeddings(tmp_path / "local"))
    ids_b, _, x_b = _by_id(read_embeddings(tmp_path / "ray"))
    assert ids_b == ids_a and len(set(ids_b)) == 11  # every readable image, once
    np.testing.assert_allclose(x_b, x_a, rtol=1e-5, atol=1e-6)


def test_a_decode_actor_turns_a_crashing_or_hanging_decoder_into_error_rows(image_folder):
    """The actor's own logic, run in this process: Ray only schedules it."""
    from crashy import crashy_decode_chunk

    from embedpipe.extraction.ray import DecodeActor
    from embedpipe.images.preprocess import Preprocessing

    make_image(image_folder / "cats" / "crash.jpg", seed=1)
    make_image(image_folder / "cats" / "hang.jpg", seed=2)
    paths = sorted(image_folder.rglob("*.*"))
    actor = DecodeActor(Preprocessing(resize_size=40, crop_size=32), "draft", 10**7, 2.0, 0,
                        decode_fn=crashy_decode_chunk)
    out = actor({"id": np.array([p.name for p in paths], object), "path": np.array([str(p) for p in paths], object)})
    errors = dict(zip(out["id"], out["error_type"]))
    assert errors.pop("crash.jpg") == "decoder_crash" and errors.pop("hang.jpg") == "timeout"
    assert set(errors.values()) == {""} and out["pixels"].shape == (len(paths), 32, 32, 3)
    assert (out["pixels"][out["error_type"] == ""].reshape(len(errors), -1).max(1) > 0).all()
    del actor


def test_a_rerun_embeds_only_what_is_missing(ray_instance, image_folder, tmp_path):
    # from a URI, as on a cluster reading object storage (file:// here, s3:// there)
    options = dict(source=image_folder.as_uri(), out=tmp_path / "emb", backbone="userbackbone:build",
                   weights="none")
    first = _run_ray(**options)
    assert (first.embedded, first.skipped) == (10, 0)
    make_image(image_folder / "cats" / "new.jpg", seed=99)
    (image_folder / "dogs" / "000.jpg").unlink()
    second = _run_ray(**options)
    assert (second.embedded, second.skipped, second.dropped) == (1, 9, 1)
    ids = read_embeddings(tmp_path / "emb").ids
    assert sorted(ids) == sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))


@pytest.mark.slow
def test_a_killed_driver_is_finished_by_the_rerun(ray_instance, image_folder, tmp_path):
    # Ray Data hands the driver a block per decode batch (64 images): make several
    for i in range(200):
        make_image(image_folder / "cats" / f"more{i:03d}.png", size=(40, 30), seed=100 + i)
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "embedpipe", "extract", str(image_folder), "--out", str(out),
           "--backbone", "userbackbone:build_slow", "--weights", "none", "--batch-size", "2",
           "--engine", "ray"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # its own session, so the kill takes the Ray instance it started too, as a lost node would
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((sidecar(out) / "journal" / "embeddings").glob("*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate()[0].decode()
    assert list((sidecar(out) / "journal" / "embeddings").glob("*")), f"no batch was written before the kill: {output}"
    # the rerun, in this process on the module's Ray instance (the engine uses one it finds
    # running): the same command, without starting a second Ray
    r = CliRunner().invoke(main, cmd[3:], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    e = read_embeddings(out)
    assert sorted(e.ids) == sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.*"))
    assert "already done" in r.stdout and not r.stdout.startswith("0 embedded, 0 already")


def test_the_output_folder_refuses_vectors_made_differently(ray_instance, image_folder, tmp_path):
    out = tmp_path / "emb"
    engine.extract(ExtractConfig(source=image_folder, out=out, backbone="userbackbone:build",
                                 weights="none", workers=1))
    with pytest.raises(MetadataMismatchError, match="seed"):
        _run_ray(source=image_folder, out=out, backbone="userbackbone:build", weights="none", seed=1)
    # the same settings on the other engine: nothing left to do
    s = _run_ray(source=image_folder, out=out, backbone="userbackbone:build", weights="none")
    assert (s.embedded, s.skipped) == (0, 10)


def test_max_errors_stops_the_job_and_keeps_the_work(ray_instance, messy_folder, tmp_path):
    with pytest.raises(TooManyErrorsError, match="saved in"):
        _run_ray(source=messy_folder, out=tmp_path / "emb", backbone="userbackbone:build",
                 weights="none", max_errors=0)
    assert len(read_errors(tmp_path / "emb")) >= 1


def test_cli_runs_the_ray_engine_on_an_unlabelled_folder(ray_instance, tmp_path):
    for i in range(10):
        make_image(tmp_path / "flat" / f"{i}.jpg", seed=i)
    r = CliRunner().invoke(main, ["extract", str(tmp_path / "flat"), "--out", str(tmp_path / "e"),
                                  "--backbone", "userbackbone:build", "--weights", "none",
                                  "--engine", "ray", "--concurrency", "1"])
    assert r.exit_code == 0, r.output
    assert "10 embedded, 0 already done, 0 errors" in r.output
    e = read_embeddings(tmp_path / "e")
    assert e.meta["runtime"]["concurrency"] == 1 and list(e.labels) == [None] * 10


def test_a_pipeline_step_runs_on_ray(ray_instance, image_folder, tmp_path):
    from embedpipe.pipeline import run_pipeline

    (tmp_path / "p.toml").write_text(
        '[pipeline]\nout = "out"\n\n[datasets.imgs]\nimages = "images"\n\n'
        '[[steps]]\nkind = "extract"\nname = "emb"\ndataset = "imgs"\nbackbone = "userbackbone:build"\n'
        'weights = "none"\nengine = "ray"\nconcurrency = 1\n'
    )
    run = run_pipeline(tmp_path / "p.toml")
    assert [s.state for s in run.statuses] == ["done"]
    e = read_embeddings(tmp_path / "out" / "emb")
    assert len(e.ids) == 10 and e.meta["runtime"]["engine"] == "ray"


def test_ray_options_need_the_ray_engine(image_folder, tmp_path):
    r = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(tmp_path / "e"),
                                  "--backbone", "lenet5", "--ray-address", "auto"])
    assert r.exit_code == 2 and "ray_address only apply to engine 'ray'" in r.output


def test_device_decoding_is_for_the_local_engine(image_folder, tmp_path):
    with pytest.raises(ValueError, match="--decode device is for the local engine"):
        _run_ray(source=image_folder, out=tmp_path / "e", backbone="lenet5", weights="none", decode="device")


def test_missing_ray_says_how_to_install_it(image_folder, tmp_path, monkeypatch):
    from embedpipe.extraction import ray as ray_engine

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "embedpipe\[ray\]"'):
        ray_engine.extract(ExtractConfig(source=image_folder, out=tmp_path / "e", backbone="lenet5",
                                         weights="none", engine="ray"))


def test_every_entry_point_runs_the_engine_the_config_names(image_folder, tmp_path, monkeypatch):
    import embedpipe
    from embedpipe.extraction import ray as ray_engine

    monkeypatch.setattr(ray_engine, "extract", lambda config, progress=False: ("ray", config.out))
    monkeypatch.setattr(engine, "extract", lambda config, progress=False: ("local", config.out))
    config = dict(source=image_folder, out=tmp_path / "e", backbone="lenet5", weights="none")
    assert embedpipe.extract(ExtractConfig(engine="ray", **config))[0] == "ray"
    assert embedpipe.extract(ExtractConfig(**config))[0] == "local"


def test_the_core_never_imports_ray():
    code = ("import sys, embedpipe.extraction.forward, embedpipe.extraction, embedpipe.pipeline, embedpipe.cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shards_on_ray_equal_the_local_engine_and_finish_every_shard(ray_instance, messy_folder, tmp_path,
                                                                     monkeypatch):
    """Tar shards read in Ray tasks: the same rows and errors as the local engine, and
    every shard recorded complete, so that a re-run opens none of them."""
    from test_container_extraction import write_shard

    from embedpipe.images import shards

    files = sorted(p for p in messy_folder.rglob("*") if p.is_file())
    for k, label in enumerate(["cats", "dogs"]):
        write_shard(tmp_path / "shards" / f"{k:05d}.tar",
                    [(p.relative_to(messy_folder).as_posix(), p.read_bytes(), label) for p in files
                     if p.parent.name == label])
    with (tmp_path / "shards" / "00002.tar").open("wb") as f:
        f.write(b"not a tar at all")  # one unreadable shard: one error row
    options = dict(source=tmp_path / "shards", backbone="userbackbone:build", weights="none", batch_size=4)
    local = engine.extract(ExtractConfig(out=tmp_path / "local", workers=1, **options))
    remote = _run_ray(out=tmp_path / "ray", **options)
    assert (remote.embedded, remote.errors, remote.images) == (local.embedded, local.errors, local.images) == (11, 4, 15)
    ids_a, labels_a, x_a = _by_id(read_embeddings(tmp_path / "local"))
    ids_b, labels_b, x_b = _by_id(read_embeddings(tmp_path / "ray"))
    assert ids_b == ids_a and labels_b == labels_a
    np.testing.assert_allclose(x_b, x_a, rtol=1e-5, atol=1e-6)
    ea, eb = (read_errors(tmp_path / d).sort_values("id").reset_index(drop=True) for d in ("local", "ray"))
    assert eb[["id", "error_type"]].equals(ea[["id", "error_type"]])

    def never(*a, **k):
        raise AssertionError("a finished shard was opened")

    monkeypatch.setattr(shards, "read_shard", never)
    again = engine.extract(ExtractConfig(out=tmp_path / "ray", workers=1, **options))
    assert (again.embedded, again.errors, again.skipped) == (0, 0, 15)
