"""``embedpipe index build|info|eval`` and ``embedpipe search`` end to end, from images on
disk, with brute-force numpy over the stored vectors as the independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import make_image

from embedpipe.cli import index as cli_index
from embedpipe.cli import main
from embedpipe.index import Index, IndexKind, Metric
from embedpipe.store import read_embeddings

COLUMNS = ["query_id", "rank", "id", "label", "score"]


def run(*args: str | Path):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


def ok(*args: str | Path):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def extract(images: Path, out: Path, backbone: str) -> Path:
    ok(
        "extract",
        images,
        "--backbone",
        backbone,
        "--weights",
        "none",
        "--out",
        out,
        "--batch-size",
        "4",
        "--workers",
        "1",
    )
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 4 images, JPEG and PNG, of mixed sizes (extracted once per module)."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(64, 48), (40, 80), (96, 96), (120, 90)]
    for c, cls in enumerate(["cats", "dogs"]):
        for i, size in enumerate(sizes):
            make_image(
                root / cls / f"{i:03d}.{'jpg' if i % 2 == 0 else 'png'}", size=size, seed=10 * c + i
            )
    return root


@pytest.fixture(scope="module")
def emb(images, tmp_path_factory) -> Path:
    return extract(images, tmp_path_factory.mktemp("emb") / "emb", "resnet18")


@pytest.fixture(scope="module")
def idx(emb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "idx"
    ok("index", "build", emb, "--out", out, "--index", "flat")
    return out


@pytest.fixture(scope="module")
def stored(emb):
    return read_embeddings(emb)


def brute_force(
    stored, query: np.ndarray, k: int, *, exclude: str | None = None, metric: str = "cosine"
):
    """(ids, scores) of the k nearest stored rows to one query vector, by numpy."""
    vectors = stored.vectors.astype(np.float64)
    q = query.astype(np.float64)
    if metric == "cosine":
        scores = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (
            q / np.linalg.norm(q)
        )
        order = np.argsort(-scores, kind="stable")
    else:
        scores = np.linalg.norm(vectors - q, axis=1)
        order = np.argsort(scores, kind="stable")
    order = [i for i in order if stored.ids[i] != exclude][:k]
    return list(stored.ids[order]), scores[order]


def vector_of(stored, id_: str) -> np.ndarray:
    return stored.vectors[list(stored.ids).index(id_)]


def rows_of(result) -> pd.DataFrame:
    return pd.DataFrame(json.loads(result.stdout), columns=COLUMNS)


# --- index build / info / eval ---------------------------------------------------


def test_build_prints_choice_and_info_shows_metadata(emb, tmp_path):
    out = tmp_path / "idx"
    built = ok(
        "index", "build", emb, "--out", out, "--memory-budget", "1GB", "--target-recall", "0.9"
    )
    assert built.output.startswith(f"built Flat over 8 x 512 (cosine) -> {out}")
    assert "why: 8 x 512: exact search, fast at this size" in built.output
    assert "memory: " in built.output and "(budget 1.0 GB)" in built.output
    assert "time: " in built.output

    text = ok("index", "info", out).output
    assert "index: Flat (flat)" in text
    assert "vectors: 8 x 512" in text
    assert "backbone: resnet18 (resnet), layer gap" in text
    assert "weights: none (random init, seed 0)" in text
    assert f"embeddings: {emb.resolve()}" in text
    meta = json.loads(ok("index", "info", out, "--json").stdout)
    assert (meta["count"], meta["dim"], meta["metric"], meta["factory"]) == (
        8,
        512,
        "cosine",
        "Flat",
    )
    assert meta["embeddings"]["backbone"] == "resnet18"
    assert meta["embeddings_path"] == str(emb.resolve())
    assert meta["memory_budget"] == 10**9


def test_build_refuses_an_existing_output_before_building(emb, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def no_build(*args, **kwargs):
        raise AssertionError("the build started although its output cannot be written")

    monkeypatch.setattr(Index, "build", no_build)
    r = run("index", "build", emb, "--out", out)
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    r = run("index", "build", emb, "--out", out, "--overwrite")
    assert r.exit_code == 1 and "not an embedpipe index" in r.output
    assert (out / "keep.txt").read_text() == "mine"


def test_build_rejects_a_budget_it_cannot_read(emb, tmp_path):
    r = run("index", "build", emb, "--out", tmp_path / "idx", "--memory-budget", "lots")
    assert r.exit_code == 1 and "cannot read memory budget 'lots'" in r.output
    assert not (tmp_path / "idx").exists()


def test_eval_flat_recall_is_one(idx):
    report = json.loads(ok("index", "eval", idx, "--queries", "5", "-k", "3", "--json").stdout)
    assert report["recall"] == 1.0 and report["k"] == 3 and report["n_queries"] == 5
    assert report["qps"] > 0 and report["index_bytes"] >= 8 * 512 * 4
    assert report["knob"] is None
    assert "recall@10: 1.0000 over 8 queries (exact search)" in ok("index", "eval", idx).output


def test_eval_reads_moved_embeddings_from_the_option(emb, tmp_path):
    moved = tmp_path / "emb"
    moved.mkdir()
    for part in emb.glob("part-*.parquet"):
        (moved / part.name).write_bytes(part.read_bytes())
    out = tmp_path / "idx"
    ok("index", "build", moved, "--out", out, "--index", "hnsw")
    for part in moved.iterdir():
        part.unlink()
    moved.rmdir()
    r = run("index", "eval", out)
    assert r.exit_code == 1 and "are gone" in r.output and "--embeddings" in r.output
    report = json.loads(ok("index", "eval", out, "--embeddings", emb, "--json").stdout)
    assert report["knob"] == "ef_search" and report["recall"] >= 0.95


# --- search ------------------------------------------------------------------------


def test_search_by_image_finds_the_image_itself(idx, images, stored):
    r = ok(
        "search",
        idx,
        "--image",
        images / "cats/000.jpg",
        images / "dogs/001.png",
        "-k",
        "3",
        "--format",
        "json",
    )
    rows = rows_of(r)
    assert (
        list(rows.query_id)
        == [str(images / "cats/000.jpg")] * 3 + [str(images / "dogs/001.png")] * 3
    )
    assert list(rows["rank"]) == [1, 2, 3] * 2
    for query_id, own in (
        ("cats/000.jpg", images / "cats/000.jpg"),
        ("dogs/001.png", images / "dogs/001.png"),
    ):
        got = rows[rows.query_id == str(own)]
        # the re-embedded query is the stored vector, so numpy on it is the reference
        ids, scores = brute_force(stored, vector_of(stored, query_id), 3)
        assert list(got.id) == ids and ids[0] == query_id
        np.testing.assert_allclose(got.score, scores, atol=1e-5)
        assert got.score.iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert set(rows.label) <= {"cats", "dogs"}


def test_search_by_id_excluding_self_matches_numpy(idx, stored):
    r = ok(
        "search",
        idx,
        "--id",
        "cats/001.png",
        "dogs/002.jpg",
        "-k",
        "4",
        "--exclude-self",
        "--format",
        "json",
    )
    rows = rows_of(r)
    for query in ("cats/001.png", "dogs/002.jpg"):
        got = rows[rows.query_id == query]
        ids, scores = brute_force(stored, vector_of(stored, query), 4, exclude=query)
        assert query not in list(got.id)
        assert list(got.id) == ids and list(got["rank"]) == [1, 2, 3, 4]
        np.testing.assert_allclose(got.score, scores, atol=1e-5)


def test_batch_search_writes_parquet_equal_to_numpy(idx, emb, stored, tmp_path):
    out = tmp_path / "neighbours.parquet"  # the format comes from the suffix
    r = ok("search", idx, "--embeddings", emb, "-k", "3", "--out", out)
    assert r.stdout == "" and "24 neighbours of 8 queries" in r.stderr
    got = pd.read_parquet(out)
    assert list(got.columns) == COLUMNS and len(got) == 8 * 3
    for query, vector in zip(stored.ids, stored.vectors):
        rows = got[got.query_id == query]
        ids, scores = brute_force(stored, vector, 3)
        assert list(rows.id) == ids and list(rows["rank"]) == [1, 2, 3]
        np.testing.assert_allclose(rows.score, scores, atol=1e-5)
        assert list(rows.label) == [i.split("/")[0] for i in ids]


def test_l2_scores_are_distances(emb, stored, tmp_path):
    out = tmp_path / "idx"
    ok("index", "build", emb, "--out", out, "--metric", "l2", "--index", "flat")
    rows = rows_of(
        ok("search", out, "--id", "dogs/003.png", "-k", "3", "--exclude-self", "--format", "json")
    )
    ids, distances = brute_force(
        stored, vector_of(stored, "dogs/003.png"), 3, exclude="dogs/003.png", metric="l2"
    )
    assert list(rows.id) == ids
    np.testing.assert_allclose(rows.score, distances, rtol=1e-4)


def test_table_json_and_parquet_agree(idx, tmp_path):
    query = ("search", idx, "--id", "cats/000.jpg", "--id", "dogs/000.jpg", "-k", "3")
    as_json = rows_of(ok(*query, "--format", "json"))
    ok(*query, "--format", "parquet", "--out", tmp_path / "r.out")
    as_parquet = pd.read_parquet(tmp_path / "r.out")
    header, *lines = ok(*query).stdout.splitlines()
    assert header.split() == COLUMNS
    as_table = pd.DataFrame([line.split() for line in lines], columns=COLUMNS)
    ok(*query, "--out", tmp_path / "r.txt")
    assert (tmp_path / "r.txt").read_text().splitlines() == [header, *lines]

    assert list(as_json.columns) == list(as_parquet.columns) == COLUMNS
    assert len(as_json) == len(as_parquet) == len(as_table) == 6
    for column in ("query_id", "id", "label"):
        assert list(as_json[column]) == list(as_parquet[column]) == list(as_table[column])
    assert list(as_json["rank"]) == list(as_parquet["rank"]) == list(as_table["rank"].astype(int))
    np.testing.assert_array_equal(as_json.score.astype(np.float32), as_parquet.score)
    np.testing.assert_allclose(as_table.score.astype(float), as_json.score, atol=1e-6)


def test_k_larger_than_the_index_gives_every_row_once(idx, emb, stored):
    rows = rows_of(ok("search", idx, "--embeddings", emb, "-k", "50", "--format", "json"))
    assert len(rows) == 8 * 8
    for _, got in rows.groupby("query_id"):
        assert list(got["rank"]) == list(range(1, 9))
        assert sorted(got.id) == sorted(stored.ids)
    rows = rows_of(
        ok("search", idx, "--id", "cats/000.jpg", "-k", "50", "--exclude-self", "--format", "json")
    )
    assert len(rows) == 7 and "-1" not in set(rows.id) and "cats/000.jpg" not in set(rows.id)


def test_query_embeddings_of_another_backbone_are_refused(idx, images, tmp_path):
    other = extract(images, tmp_path / "lenet", "lenet5")
    r = run("search", idx, "--embeddings", other, "-k", "3")
    assert r.exit_code == 1
    assert 'backbone: "lenet5" (queries) != "resnet18" (index)' in r.output
    assert "dim: 120 (queries) != 512 (index)" in r.output
    assert "Traceback" not in r.output


def test_unreadable_images_are_reported_and_skipped(idx, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "missing.jpg"
    r = run(
        "search",
        idx,
        "--image",
        missing,
        images / "dogs/002.jpg",
        broken,
        "-k",
        "2",
        "--format",
        "json",
    )
    assert r.exit_code == 0, r.output
    assert f"skipped {missing}: not_found" in r.stderr
    assert f"skipped {broken}: " in r.stderr
    rows = rows_of(r)
    assert (
        set(rows.query_id) == {str(images / "dogs/002.jpg")} and rows.id.iloc[0] == "dogs/002.jpg"
    )

    r = run("search", idx, "--image", missing, broken)
    assert r.exit_code == 1
    assert "none of the 2 query images could be embedded" in r.output and "not_found" in r.output


def test_unknown_id_is_a_clear_error(idx):
    r = run("search", idx, "--id", "cats/999.jpg")
    assert r.exit_code == 1 and "the index holds no id 'cats/999.jpg'" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give exactly one of --image, --id or --embeddings (got none)"),
        (("--id", "cats/000.jpg", "--image", "a.jpg"), "(got --image and --id)"),
        (("--id", "cats/000.jpg", "--embeddings", "."), "(got --id and --embeddings)"),
        (("--image", "a.jpg", "--exclude-self"), "--exclude-self needs --id or --embeddings"),
        (("--id", "cats/000.jpg", "--format", "parquet"), "--format parquet needs --out"),
        (("--embeddings", ".", "extra"), "unexpected arguments extra"),
    ],
)
def test_search_usage_errors(idx, args, message):
    r = run("search", idx, *args)
    assert r.exit_code == 2 and message in r.output


def test_queries_without_an_option_are_files_or_ids(idx, images, stored):
    """`search IDX a.jpg` searches the image; `search IDX cats/000.jpg` the indexed row."""
    by_file = json.loads(ok("search", idx, images / "cats" / "000.jpg", "-k", "3", "--format", "json").output)
    by_option = json.loads(ok("search", idx, "--image", images / "cats" / "000.jpg", "-k", "3",
                              "--format", "json").output)
    assert by_file == by_option and by_file[0]["id"] == "cats/000.jpg"
    by_id = json.loads(ok("search", idx, "cats/000.jpg", "-k", "3", "--format", "json").output)
    assert by_id == json.loads(ok("search", idx, "--id", "cats/000.jpg", "-k", "3", "--format", "json").output)
    r = run("search", idx, images / "cats" / "000.jpg", "cats/001.png")
    assert r.exit_code == 2 and "search images and ids separately" in r.output


def test_hints_point_to_the_right_command(emb, idx, tmp_path):
    r = run("search", emb, "--id", "cats/000.jpg")
    assert r.exit_code == 1 and "is an embeddings dataset, not an index" in r.output
    assert f"--out {emb}-index" in r.output  # not the embeddings folder itself
    r = run("info", idx)
    assert r.exit_code == 1 and f"see `embedpipe index info {idx}`" in r.output
    (tmp_path / "empty").mkdir()
    r = run("index", "build", tmp_path / "empty", "--out", tmp_path / "i")
    assert r.exit_code == 1 and "run `embedpipe extract IMAGES" in r.output


def test_cli_choices_are_the_apis():
    # spelt out in the CLI so that `embedpipe --help` does not import FAISS
    assert list(cli_index.METRICS) == [m.value for m in Metric]
    assert list(cli_index.INDEX_KINDS) == [k.value for k in IndexKind]


def test_gallery_draws_each_query_beside_its_neighbours(idx, images, tmp_path):
    from PIL import Image

    out = tmp_path / "viz" / "q.png"
    ok("search", idx, "--id", "cats/000.jpg", "-k", "20", "--exclude-self", "--gallery", out)
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 400  # the query and 7 neighbours (k > N)
    ok("search", idx, "--image", images / "dogs" / "001.png", images / "cats" / "002.jpg",
       "-k", "3", "--gallery", out)
    assert (tmp_path / "viz" / "q_0.png").exists() and (tmp_path / "viz" / "q_1.png").exists()
