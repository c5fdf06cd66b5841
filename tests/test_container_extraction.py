"""Extraction from tar shards and Parquet image tables, against the same images as a folder."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import make_image
from PIL import Image

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.errors import SourceError
from embedpipe.extraction import extract
from embedpipe.images import shards
from embedpipe.store import read_embeddings, read_errors, sidecar

TESTS = Path(__file__).parent


def config(source, out: Path, **kw) -> ExtractConfig:
    # a small user backbone (tests/userbackbone.py): what is compared is the data path
    return ExtractConfig(source=source, out=out, **{
        "backbone": "userbackbone:build", "weights": "none", "batch_size": 4, "workers": 1, **kw})


def write_shard(path: Path, samples: list[tuple[str, bytes, str | None]]) -> Path:
    """A WebDataset shard: ``key.<ext>`` (+ ``key.cls``) per (image name, bytes, label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data, label in samples:
            key = name.rsplit(".", 1)[0]
            members = [(name, data)] + ([(f"{key}.cls", label.encode())] if label is not None else [])
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def folder_samples(folder: Path) -> list[tuple[str, bytes, str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(p.relative_to(folder).as_posix(), p.read_bytes(), p.parent.name) for p in files]


@pytest.fixture
def folder_and_shards(image_folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The 10 images of ``image_folder`` (cats/, dogs/) as two shards: cats, then dogs."""
    samples = folder_samples(image_folder)
    write_shard(tmp_path / "shards" / "00000.tar", [s for s in samples if s[2] == "cats"])
    write_shard(tmp_path / "shards" / "00001.tar", [s for s in samples if s[2] == "dogs"])
    return image_folder, tmp_path / "shards"


def by_id(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    e = read_embeddings(path)
    return {i: (v, label) for i, v, label in zip(e.ids, e.vectors, e.labels)}


def test_shards_give_the_vectors_and_labels_of_the_same_images_in_a_folder(folder_and_shards, tmp_path):
    folder, shard_dir = folder_and_shards
    extract(config(folder, tmp_path / "from-folder"))
    summary = extract(config(str(shard_dir / "{00000..00001}.tar"), tmp_path / "from-shards"))
    assert (summary.images, summary.embedded, summary.errors) == (10, 10, 0)
    want, got = by_id(tmp_path / "from-folder"), by_id(tmp_path / "from-shards")
    # ids: shard name / WebDataset key (the member's path without its extension)
    assert sorted(got) == sorted(
        f"{'00000' if i.startswith('cats') else '00001'}/{i.rsplit('.', 1)[0]}" for i in want)
    for i, (v, label) in want.items():
        g, g_label = got[f"{'00000' if i.startswith('cats') else '00001'}/{i.rsplit('.', 1)[0]}"]
        np.testing.assert_array_equal(g, v)  # the same bytes, the same decode path
        assert g_label == label
    f, s = (pq.read_table(tmp_path / d).sort_by("content_hash") for d in ("from-folder", "from-shards"))
    for column in ("width", "height", "content_hash", "size"):
        assert s.column(column).to_pylist() == f.column(column).to_pylist()


def test_an_image_table_gives_the_vectors_of_the_same_images_in_a_folder(image_folder, tmp_path):
    samples = folder_samples(image_folder)
    table = pa.table({
        "name": [k.rsplit(".", 1)[0] for k, _, _ in samples],
        "image": pa.array([{"bytes": d, "path": None} for _, d, _ in samples],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "animal": [label for _, _, label in samples],
    })
    pq.write_table(table, tmp_path / "train-0.parquet", row_group_size=3)
    extract(config(image_folder, tmp_path / "from-folder"))
    summary = extract(config(str(tmp_path / "train-*.parquet"), tmp_path / "from-table",
                             image_column="image", id_column="name", label_column="animal"))
    assert (summary.embedded, summary.errors) == (10, 0)
    want, got = by_id(tmp_path / "from-folder"), by_id(tmp_path / "from-table")
    assert sorted(got) == sorted(f"train-0/{i.rsplit('.', 1)[0]}" for i in want)
    for i, (v, label) in want.items():
        np.testing.assert_array_equal(got[f"train-0/{i.rsplit('.', 1)[0]}"][0], v)
        assert got[f"train-0/{i.rsplit('.', 1)[0]}"][1] == label


def test_a_rerun_skips_finished_shards_without_opening_them(folder_and_shards, tmp_path, monkeypatch):
    _, shard_dir = folder_and_shards
    cfg = config(shard_dir, tmp_path / "emb")  # a folder of shards
    extract(cfg)

    def never(*a, **k):
        raise AssertionError("a finished shard was opened")

    monkeypatch.setattr(shards, "read_shard", never)
    again = extract(cfg)
    assert (again.embedded, again.skipped, again.dropped, again.images) == (0, 10, 0, 10)


def test_new_changed_and_deleted_shards(folder_and_shards, tmp_path):
    folder, shard_dir = folder_and_shards
    cfg = config(shard_dir, tmp_path / "emb")
    extract(cfg)
    samples = folder_samples(folder)
    extra = make_image(tmp_path / "x" / "new.png", seed=42).read_bytes()
    write_shard(shard_dir / "00002.tar", [("birds/new.png", extra, "birds")])  # new
    write_shard(shard_dir / "00001.tar", [s for s in samples if s[2] == "dogs"][:2])  # changed: 3 fewer
    run = extract(cfg)
    assert (run.embedded, run.dropped, run.skipped) == (3, 5, 5)
    ids = sorted(by_id(tmp_path / "emb"))
    assert len(ids) == 8 and "00002/birds/new" in ids
    (shard_dir / "00000.tar").unlink()  # deleted
    run = extract(cfg)
    assert (run.embedded, run.dropped) == (0, 5)
    assert sorted(by_id(tmp_path / "emb")) == [i for i in ids if not i.startswith("00000/")]


def test_a_truncated_shard_keeps_the_samples_before_the_break(folder_and_shards, tmp_path):
    _, shard_dir = folder_and_shards
    whole = (shard_dir / "00001.tar").read_bytes()
    (shard_dir / "00001.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut in its 4th sample
    good = make_image(tmp_path / "y.png", seed=4).read_bytes()
    bad = b"plain text, not an image"
    write_shard(shard_dir / "00002.tar", [("b/ok.png", good, "b"), ("b/bad.png", bad, "b"), ("b/none.png", b"", "b")])
    cfg = config(shard_dir, tmp_path / "emb")
    run = extract(cfg)
    errors = read_errors(tmp_path / "emb").set_index("id")["error_type"].to_dict()
    assert errors["00002/b/bad"] == "not_an_image"
    assert errors["00002/b/none"] == "empty_file"
    assert [v for k, v in errors.items() if k.startswith("00001")] == ["truncated"]
    embedded = sorted(by_id(tmp_path / "emb"))
    assert len([i for i in embedded if i.startswith("00001/")]) == 3  # the samples before the break
    assert run.embedded + run.errors == len(embedded) + len(errors)
    again = extract(cfg)  # every shard complete: nothing read again, nothing counted twice
    assert (again.embedded, again.errors, again.skipped) == (0, 0, len(embedded) + len(errors))


@pytest.mark.slow
def test_killed_mid_shard_the_rerun_embeds_every_sample_exactly_once(tmp_path, monkeypatch):
    """The model kills its process (os._exit, as kill -9: no cleanup) at the first batch
    holding a red image, mid-way through the second shard; the same command again ends
    with every sample once, equal to an uninterrupted run."""
    colours = {}
    for s in range(3):
        samples = []
        for k in range(8):
            red = (s, k) == (1, 5)
            img = Image.new("RGB", (40, 40), (255, 0, 0)) if red else Image.open(
                make_image(tmp_path / "src" / f"{s}-{k}.png", seed=10 * s + k))
            buf = io.BytesIO()
            img.save(buf, "PNG")
            samples.append((f"s{k:02d}.png", buf.getvalue(), str(k % 2)))
            colours[f"{s:05d}/s{k:02d}"] = red
        write_shard(tmp_path / "shards" / f"{s:05d}.tar", samples)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "EMBEDPIPE_TEST_DIE_FLAG": str(tmp_path / "died")}

    def run(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "embedpipe", "-q", "extract", str(tmp_path / "shards" / "{00000..00002}.tar"),
             "--backbone", "userbackbone:build_dies_once", "--weights", "none", "--out", str(out),
             "--batch-size", "2", "--workers", "1", "--part-rows", "4"],
            env=env, capture_output=True, text=True, timeout=300)

    died = run(tmp_path / "emb")
    assert died.returncode == 1 and (tmp_path / "died").exists(), died.stderr
    containers = (sidecar(tmp_path / "emb") / "containers.jsonl").read_text()
    assert '"00000", "size"' in containers and '"00001", "size"' in containers  # died in the second
    done = run(tmp_path / "emb")
    assert done.returncode == 0, done.stderr
    embedded, skipped = (int(w) for w in done.stdout.split()[0:3:2])
    assert skipped >= 8 and embedded + skipped == 24  # the first shard and part of the second kept
    monkeypatch.setenv("EMBEDPIPE_TEST_DIE_FLAG", str(tmp_path / "died"))  # spent: nothing dies
    extract(config(str(tmp_path / "shards" / "{00000..00002}.tar"), tmp_path / "clean",
                   backbone="userbackbone:build_dies_once", batch_size=2, part_rows=4))
    got, want = by_id(tmp_path / "emb"), by_id(tmp_path / "clean")
    assert sorted(got) == sorted(want) == sorted(colours)  # every sample exactly once
    for i in want:
        np.testing.assert_array_equal(got[i][0], want[i][0])


def test_a_fraction_of_errors_needs_a_count_for_shards(folder_and_shards, tmp_path):
    _, shard_dir = folder_and_shards
    with pytest.raises(SourceError, match="give a number of images"):
        extract(config(shard_dir, tmp_path / "emb", max_errors=0.1))


def test_cli_reads_shard_patterns_and_image_tables(folder_and_shards, tmp_path):
    folder, shard_dir = folder_and_shards
    common = ["--backbone", "userbackbone:build", "--weights", "none", "--batch-size", "4", "--workers", "1"]
    r = CliRunner().invoke(main, ["-q", "extract", str(shard_dir / "{00000..00001}.tar"), "--out",
                                  str(tmp_path / "a"), *common])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("10 embedded, 0 already done, 0 errors")
    samples = folder_samples(folder)
    pq.write_table(pa.table({"img": [d for _, d, _ in samples], "y": [lab for *_, lab in samples]}),
                   tmp_path / "t.parquet")
    r = CliRunner().invoke(main, ["-q", "extract", str(tmp_path / "t.parquet"), "--image-column", "img",
                                  "--label-column", "y", "--out", str(tmp_path / "b"), *common])
    assert r.exit_code == 0, r.output
    assert sorted(read_embeddings(tmp_path / "b").ids) == sorted(f"t/{i}" for i in range(10))
    r = CliRunner().invoke(main, ["-q", "extract", str(tmp_path / "t.parquet"), "--image-column", "nope",
                                  "--out", str(tmp_path / "c"), *common])
    assert r.exit_code != 0 and "img" in r.output  # the columns it has, named


def test_shards_through_a_uri(folder_and_shards, tmp_path):
    """Shards named by a URI stream through the file system layer (pyarrow's), like s3://."""
    _, shard_dir = folder_and_shards
    summary = extract(config(shard_dir.as_uri() + "/{00000..00001}.tar", tmp_path / "emb"))
    assert (summary.embedded, summary.errors) == (10, 0)
    local = by_id(tmp_path / "emb")
    extract(config(shard_dir, tmp_path / "local"))
    assert local.keys() == by_id(tmp_path / "local").keys()
