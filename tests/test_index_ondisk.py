"""Inverted lists on disk (index build --on-disk): the same index as in memory, with its
lists in lists.ivfdata beside index.faiss, found wherever the directory moves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_index_ray import parted_dataset

from embedpipe.errors import IndexSpecError
from embedpipe.index import Index, build_embeddings, update_embeddings
from embedpipe.index.ondisk import LISTS_FILE, lists_file
from embedpipe.store import read_embeddings

DIM = 16


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return parted_dataset(tmp_path_factory.mktemp("ondisk") / "emb", n=3000, dim=DIM)


def brute_force_recall(index: Index, emb: Path, queries: np.ndarray, k: int = 10) -> float:
    e = read_embeddings(emb)
    xb = e.vectors / np.linalg.norm(e.vectors, axis=1, keepdims=True)
    xq = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1)[:, :k]
    found = index.search(queries, k).id.reshape(len(queries), k)
    return float(np.mean([len(set(e.ids[t]) & set(f)) / k for t, f in zip(truth, found)]))


@pytest.mark.parametrize("spec", ["IVF32,Flat", "IVF32,SQ8", "OPQ4,IVF32,PQ4"])
def test_lists_on_disk_answer_as_in_memory_and_move_with_the_directory(emb, tmp_path, spec):
    lists = tmp_path / "lists"
    memory = build_embeddings(emb, index=spec, seed=3)
    disk = build_embeddings(emb, index=spec, seed=3, lists_dir=lists)
    assert lists_file(memory.parts()[0]) is None
    assert lists_file(disk.parts()[0]) == lists / LISTS_FILE
    assert [p.name for p in lists.iterdir()] == [LISTS_FILE]  # shards and tuning lists gone
    np.testing.assert_array_equal(disk.parts()[1], memory.parts()[1])  # same rows, same order
    assert disk.info.tuning == memory.info.tuning
    assert "inverted lists on disk" in disk.info.reason
    queries = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32)
    a, b = memory.search(queries, 10), disk.search(queries, 10)
    np.testing.assert_array_equal(b.id, a.id)
    np.testing.assert_allclose(b.score, a.score, rtol=1e-6, atol=1e-6)
    if spec == "IVF32,Flat":  # stores the vectors: recall on queries like the rows, by brute force
        rng = np.random.default_rng(4)
        near = read_embeddings(emb).vectors[rng.choice(3000, 300)] + 0.3 * rng.normal(size=(300, DIM))
        assert brute_force_recall(disk, emb, near.astype(np.float32)) >= disk.info.tuning.target_recall - 0.03
    assert disk.search_ids(["00042.png"], 3).id[0] == "00042.png"  # rows reconstruct by id

    disk.save(tmp_path / "idx")
    shutil.rmtree(lists)
    moved = shutil.move(tmp_path / "idx", tmp_path / "elsewhere")
    reopened = Index.open(moved)
    assert lists_file(reopened.parts()[0]) == Path(moved) / LISTS_FILE
    np.testing.assert_array_equal(reopened.search(queries, 10).id, a.id)
    if spec == "IVF32,Flat":  # the lists are the bulk of it, and stay out of index.faiss
        assert (Path(moved) / "index.faiss").stat().st_size < (Path(moved) / LISTS_FILE).stat().st_size / 4


def test_only_inverted_lists_go_to_disk(emb, tmp_path):
    for spec in ("hnsw", "flat"):
        with pytest.raises(IndexSpecError, match="no inverted lists to keep on disk"):
            build_embeddings(emb, index=spec, lists_dir=tmp_path / "lists")
    # auto keeps to the IVF family when the lists go to disk
    assert build_embeddings(emb, lists_dir=tmp_path / "lists").info.factory.startswith("IVF")


def test_an_on_disk_index_is_not_updated_in_place(emb, tmp_path):
    lists = tmp_path / "lists"
    build_embeddings(emb, index="IVF32,Flat", lists_dir=lists).save(tmp_path / "idx")
    before = (tmp_path / "idx" / LISTS_FILE).read_bytes()
    with pytest.raises(IndexSpecError, match="lists on disk.*rebuild it"):
        update_embeddings(tmp_path / "idx", emb)
    assert (tmp_path / "idx" / LISTS_FILE).read_bytes() == before


def test_the_command_writes_the_lists_into_the_index_and_cleans_up(emb, tmp_path):
    from embedpipe.cli import main

    out = tmp_path / "idx"
    r = CliRunner().invoke(main, ["index", "build", str(emb), "--out", str(out), "--index",
                                  "IVF32,SQ8", "--on-disk"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # the lists' scratch folder is gone
    assert (out / LISTS_FILE).is_file() and "inverted lists on disk" in r.output
    # a search prints clean JSON: FAISS's notice on opening the lists, written by C++ to
    # the process's stdout (which CliRunner does not capture), is silenced
    r = subprocess.run([sys.executable, "-m", "embedpipe", "search", str(out), "--id", "00042.png",
                        "-k", "3", "--format", "json"], capture_output=True, text=True, check=True)
    assert [row["id"] for row in json.loads(r.stdout)][0] == "00042.png"
