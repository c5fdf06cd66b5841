"""``update_index`` / ``embedpipe index update``: grow and shrink a built index without
training it again (issue 19)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from embedpipe.cli import main
from embedpipe.errors import MetadataMismatchError
from embedpipe.index import IDS_FILE, Block, Index, update_embeddings, update_index

ROOT = Path(__file__).parent.parent
META = {"backbone": "lenet5", "dim": 16, "layer": "gap"}


def _dataset(out: Path, ids, vectors: np.ndarray, meta: dict | None = None) -> Path:
    """An embedpipe dataset at ``out`` with the given ids and (n, 16) vectors."""
    from embedpipe.store import DatasetWriter, embeddings_schema, embeddings_table

    n, d = vectors.shape
    with DatasetWriter(out, meta or META) as w:
        w.append(embeddings_table(
            ids=list(ids), labels=["x"] * n, vectors=np.asarray(vectors, np.float32),
            width=[1] * n, height=[1] * n, size=[1] * n, mtime_ns=[1] * n,
            content_hash=["h"] * n, schema=embeddings_schema(d)))  # fmt: skip
    return out


def _clustered(rng, n: int, d: int = 16) -> np.ndarray:
    centers = np.random.default_rng(99).normal(size=(20, d))
    return (centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def _changes(rng, ids: np.ndarray, x: np.ndarray, *, removed: int, changed: int, added: int):
    """The dataset after an edit: ``removed`` rows gone, ``changed`` re-embedded, ``added`` new.
    Returns (ids, vectors, removed ids, changed ids, added ids)."""
    gone = rng.choice(len(ids), removed, replace=False)
    keep = np.ones(len(ids), bool)
    keep[gone] = False
    new_ids, new_x = ids[keep], x[keep].copy()
    moved = rng.choice(len(new_ids), changed, replace=False)
    new_x[moved] = _clustered(rng, changed, x.shape[1])
    fresh = np.array([f"new{i:05d}" for i in range(added)], dtype=object)
    return (np.concatenate([new_ids, fresh]), np.concatenate([new_x, _clustered(rng, added, x.shape[1])]),
            set(ids[gone]), set(new_ids[moved]), set(fresh))  # fmt: skip


def _ids(n: int) -> np.ndarray:
    return np.array([f"r{i:05d}" for i in range(n)], dtype=object)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_updating_a_flat_index_equals_a_fresh_build(metric):
    rng = np.random.default_rng(0)
    ids, x = _ids(600), _clustered(rng, 600)
    built = Index.build(Block(ids, None, x), index="flat", metric=metric)
    ids2, x2, _, changed, _ = _changes(rng, ids, x, removed=40, changed=15, added=80)

    updated, report = update_index(built, Block(ids2, None, x2))
    fresh = Index.build(Block(ids2, None, x2), index="flat", metric=metric)

    assert (report.added, report.removed, report.replaced, report.count) == (80, 40, 15, 640)
    assert report.removal == "in place" and report.recall is None
    queries = _clustered(rng, 50)
    a, b = updated.search(queries, 10).to_frame(), fresh.search(queries, 10).to_frame()
    assert a["id"].tolist() == b["id"].tolist()
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)
    # a changed row is found by its new vector, not its old one
    one = min(changed)
    hit = updated.search(x2[list(ids2).index(one)][None], 1).to_frame()
    assert hit["id"].tolist() == [one]
    assert updated.eval(Block(ids2, None, x2), n_queries=50).recall == 1.0


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,SQ8", "HNSW16"])
def test_an_updated_approximate_index_keeps_its_recall(factory, tmp_path):
    rng = np.random.default_rng(1)
    ids, x = _ids(3000), _clustered(rng, 3000)
    built = Index.build(Block(ids, None, x), index=factory, target_recall=0.9)
    quantiser = built.parts()[0]
    ids2, x2, gone, _, added = _changes(rng, ids, x, removed=200, changed=40, added=300)

    updated, report = update_index(built, Block(ids2, None, x2))

    assert (report.added, report.removed, report.replaced) == (300, 200, 40)
    assert report.removal == ("rebuilt" if factory.startswith("HNSW") else "in place")
    if factory.startswith("IVF"):  # the trained quantiser is the one the build made
        assert updated.parts()[0] is quantiser
    assert report.held_out and report.n_queries == 170 and report.recall >= 0.85
    assert json.loads(json.dumps(updated.info.update))["recall"] == report.recall
    # brute force over the final rows: recall of new queries, new ids found, removed ones gone
    queries = _clustered(rng, 200)
    unit = x2 / np.linalg.norm(x2, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = ids2[np.argsort(-(q @ unit.T), axis=1)[:, :10]]
    found = updated.search(queries, 10).to_frame().groupby("query_id", sort=False)["id"].apply(set)
    recall = np.mean([len(found[str(i)] & set(truth[i])) / 10 for i in range(len(q))])
    assert recall >= 0.85
    hits = set(updated.search(x2, 10).to_frame()["id"])
    assert not hits & gone and added <= hits
    first = updated.search_ids(sorted(added)[:5], 1).to_frame()
    assert first["id"].tolist() == sorted(added)[:5]
    # the directory round trip keeps rows, positions and fingerprints
    reopened = Index.open(updated.save(tmp_path / "idx"))
    assert reopened.eval(Block(ids2, None, x2), n_queries=100).recall >= 0.85
    assert update_index(reopened, Block(ids2, None, x2))[1].added == 0


def test_a_recall_drift_is_reported_with_the_figure(caplog):
    rng = np.random.default_rng(2)
    ids, x = _ids(2000), _clustered(rng, 2000)
    built = Index.build(Block(ids, None, x), index="IVF16,SQ8", target_recall=0.9)
    ids2, x2, *_ = _changes(rng, ids, x, removed=0, changed=0, added=100)
    with caplog.at_level(logging.WARNING, logger="embedpipe.index.update"):
        _, report = update_index(built, Block(ids2, None, x2), retrain_if_below=0.9999)
    assert report.rebuild_advised and report.threshold == 0.9999
    assert f"{report.recall:.3f}" in caplog.text and "rebuild" in caplog.text


def test_embeddings_made_differently_are_refused_with_the_differences(tmp_path):
    rng = np.random.default_rng(3)
    ids, x = _ids(300), _clustered(rng, 300)
    _dataset(tmp_path / "emb", ids, x)
    from embedpipe.index import embedding_blocks

    Index.build(embedding_blocks(tmp_path / "emb"), index="flat").save(tmp_path / "idx")
    _dataset(tmp_path / "other", ids, x, meta={**META, "backbone": "resnet18"})
    before = (tmp_path / "idx" / IDS_FILE).read_bytes()
    with pytest.raises(MetadataMismatchError, match=r"backbone: \"lenet5\" \(index\) != \"resnet18\""):
        update_embeddings(tmp_path / "idx", tmp_path / "other")
    assert (tmp_path / "idx" / IDS_FILE).read_bytes() == before


def test_an_index_without_fingerprints_still_adds_and_removes(tmp_path):
    rng = np.random.default_rng(4)
    ids, x = _ids(300), _clustered(rng, 300)
    path = Index.build(Block(ids, None, x), index="flat").save(tmp_path / "idx")
    table = pq.read_table(path / IDS_FILE)
    pq.write_table(table.drop_columns(["fingerprint"]), path / IDS_FILE)  # as written before them
    ids2, x2, *_ = _changes(rng, ids, x, removed=10, changed=5, added=20)
    updated, report = update_index(Index.open(path), Block(ids2, None, x2))
    assert not report.changes_detected
    assert (report.added, report.removed, report.replaced, report.count) == (20, 10, 0, 310)
    assert updated.parts()[4] is not None  # recorded from now on


_KILLED_UPDATE = """
import os, signal, sys
import embedpipe.index.core as core
from embedpipe.index import update_embeddings

def killed(tmp, path):  # every new file is written: die before the swap, as kill -9 would
    os.kill(os.getpid(), signal.SIGKILL)

core.replace_dir = killed
update_embeddings(sys.argv[1], sys.argv[2])
"""


def test_an_update_killed_before_the_swap_leaves_the_previous_index(tmp_path):
    rng = np.random.default_rng(5)
    ids, x = _ids(400), _clustered(rng, 400)
    from embedpipe.index import embedding_blocks

    _dataset(tmp_path / "emb", ids, x)
    idx = Index.build(embedding_blocks(tmp_path / "emb"), index="flat").save(tmp_path / "idx")
    files = {p.name: p.read_bytes() for p in idx.iterdir()}
    ids2, x2, *_ = _changes(rng, ids, x, removed=30, changed=0, added=50)
    _dataset(tmp_path / "emb2", ids2, x2)

    r = subprocess.run([sys.executable, "-c", _KILLED_UPDATE, str(idx), str(tmp_path / "emb2")],
                       cwd=ROOT, capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == -9, r.stderr
    assert {p.name: p.read_bytes() for p in idx.iterdir()} == files
    assert len(Index.open(idx)) == 400
    # the next update finishes what the killed one began
    _, report = update_embeddings(idx, tmp_path / "emb2")
    assert (report.added, report.removed, len(Index.open(idx))) == (50, 30, 420)


def test_the_cli_updates_an_index(tmp_path):
    rng = np.random.default_rng(6)
    ids, x = _ids(200), _clustered(rng, 200)
    _dataset(tmp_path / "emb", ids, x)
    runner = CliRunner()
    r = runner.invoke(main, ["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"),
                             "--index", "flat"])  # fmt: skip
    assert r.exit_code == 0, r.output
    ids2, x2, *_ = _changes(rng, ids, x, removed=5, changed=3, added=7)
    _dataset(tmp_path / "emb2", ids2, x2)

    r = runner.invoke(main, ["index", "update", str(tmp_path / "idx"), str(tmp_path / "emb2")])
    assert r.exit_code == 0, r.output
    assert "7 added, 5 removed, 3 replaced, 192 unchanged -> 202 rows" in r.output
    r = runner.invoke(main, ["index", "info", str(tmp_path / "idx")])
    assert "last update" in r.output and "+7 -5 ~3" in r.output
    r = runner.invoke(main, ["index", "update", str(tmp_path / "idx"), str(tmp_path / "emb2"),
                             "--format", "json"])  # fmt: skip
    assert json.loads(r.output)["added"] == 0
    assert pd.read_parquet(tmp_path / "idx" / IDS_FILE)["id"].is_unique


def test_a_pipeline_updates_its_index_when_only_rows_changed(image_folder, tmp_path):
    from conftest import make_image

    from embedpipe.pipeline import run_pipeline

    path = tmp_path / "p.toml"
    path.write_text(
        '[pipeline]\nout = "out"\n[datasets.imgs]\nimages = "images"\n'
        '[[steps]]\nkind = "extract"\nname = "emb"\ndataset = "imgs"\nbackbone = "lenet5"\n'
        'weights = "none"\nworkers = 1\n'
        '[[steps]]\nkind = "index"\nname = "idx"\ninput = "emb"\nindex = "flat"\n'
    )
    run_pipeline(path)
    make_image(image_folder / "cats" / "new.png", seed=5)
    (image_folder / "dogs" / "000.jpg").unlink()
    done = {s.step.name: s.detail for s in run_pipeline(path).statuses}
    assert done["idx"] == "Flat updated: 1 added, 1 removed, 0 replaced -> 10 vectors"
    assert "cats/new.png" in Index.open(tmp_path / "out" / "idx")


def test_a_pipeline_index_on_disk_is_rebuilt_not_updated(image_folder, tmp_path):
    from conftest import make_image

    from embedpipe.index.ondisk import LISTS_FILE
    from embedpipe.pipeline import run_pipeline

    path = tmp_path / "p.toml"
    path.write_text(
        '[pipeline]\nout = "out"\n[datasets.imgs]\nimages = "images"\n'
        '[[steps]]\nkind = "extract"\nname = "emb"\ndataset = "imgs"\nbackbone = "lenet5"\n'
        'weights = "none"\nworkers = 1\n'
        '[[steps]]\nkind = "index"\nname = "idx"\ninput = "emb"\nindex = "IVF2,Flat"\non_disk = true\n'
    )
    run_pipeline(path)
    assert (tmp_path / "out" / "idx" / LISTS_FILE).is_file()
    make_image(image_folder / "cats" / "new.png", seed=5)
    done = {s.step.name: s.detail for s in run_pipeline(path).statuses}
    assert done["idx"] == "IVF2,Flat over 11 vectors"  # rebuilt: on-disk lists cannot grow
    assert "cats/new.png" in Index.open(tmp_path / "out" / "idx")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".idx")) == []
