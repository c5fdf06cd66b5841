"""Embeddings other tools wrote: pandas, polars, DuckDB, pyarrow tables and .npy matrices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import require

from embedpipe.cli import main
from embedpipe.errors import IndexInputError, StoreError
from embedpipe.index import Index, embedding_blocks
from embedpipe.tables import Columns, read_any

N, D = 120, 8


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N, D)).astype(np.float32)
    ids = np.array([f"img/{i:04d}.jpg" for i in range(N)], dtype=object)
    labels = np.array([f"c{i % 3}" for i in range(N)], dtype=object)
    return ids, labels, vectors


def write_pandas(path, ids, labels, vectors):
    pd.DataFrame({"id": ids, "label": labels, "embedding": list(vectors.astype(np.float64))}).to_parquet(path)


def write_polars(path, ids, labels, vectors):
    pl = require("polars", "reading tables polars wrote")
    pl.DataFrame({"image": list(ids), "label": list(labels),
                  "vec": pl.Series(vectors, dtype=pl.Array(pl.Float32, D))}).write_parquet(path)


def write_duckdb(path, ids, labels, vectors):
    duckdb = require("duckdb", "reading tables DuckDB wrote")
    frame = pd.DataFrame({"id": ids, "label": labels, "emb": [list(map(float, v)) for v in vectors]})
    con = duckdb.connect()
    con.register("frame", frame)
    con.execute(f"COPY (SELECT id, label, CAST(emb AS FLOAT[]) AS emb FROM frame) TO '{path}' (FORMAT parquet)")


def write_pyarrow(path, ids, labels, vectors):
    flat = pa.array(vectors.astype(np.float16).reshape(-1))
    pq.write_table(pa.table({"id": list(ids), "label": list(labels),
                             "embedding": pa.FixedSizeListArray.from_arrays(flat, D)}), path)


WRITERS = {"pandas": (write_pandas, {}), "polars": (write_polars, {"id": "image", "embedding": "vec"}),
           "duckdb": (write_duckdb, {}), "pyarrow-float16": (write_pyarrow, {})}


@pytest.mark.parametrize("writer", WRITERS)
def test_tables_other_tools_wrote_read_as_embeddings(tmp_path, data, writer):
    ids, labels, vectors = data
    write, names = WRITERS[writer]
    folder = tmp_path / "emb"
    folder.mkdir()
    write(folder / "anything-0.parquet", ids[:70], labels[:70], vectors[:70])
    write(folder / "anything-1.parquet", ids[70:], labels[70:], vectors[70:])
    e = read_any(folder, Columns(**names))
    order = np.argsort(e.ids)
    assert list(e.ids[order]) == list(ids) and list(e.labels[order]) == list(labels)
    tol = 1e-3 if writer == "pyarrow-float16" else 1e-6
    np.testing.assert_allclose(e.vectors[order], vectors, rtol=tol, atol=tol)
    assert e.meta == {}


def test_an_index_over_a_foreign_table_equals_brute_force(tmp_path, data):
    ids, labels, vectors = data
    write_pandas(tmp_path / "t.parquet", ids, labels, vectors)
    index = Index.build(embedding_blocks(tmp_path / "t.parquet"), index="flat", metric="l2")
    results = index.search(vectors[:5], 4).to_frame()
    d2 = ((vectors[:5, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    for q in range(5):
        assert list(results[results.query_id == str(q)]["id"]) == list(ids[np.argsort(d2[q])[:4]])
    index.save(tmp_path / "idx")
    r = CliRunner().invoke(main, ["index", "info", str(tmp_path / "idx")])
    assert "provenance unknown" in r.output
    with pytest.raises(IndexInputError, match="records no backbone.*search it by vectors"):
        from embedpipe.index import search_images

        search_images(Index.open(tmp_path / "idx"), [tmp_path / "q.jpg"], 3)


def test_an_npy_matrix_with_its_ids(tmp_path, data):
    ids, labels, vectors = data
    np.save(tmp_path / "img_emb_0.npy", vectors)
    pq.write_table(pa.table({"image_path": list(ids)}), tmp_path / "metadata_0.parquet")
    e = read_any(tmp_path / "img_emb_0.npy", Columns(id="image_path", ids=tmp_path / "metadata_0.parquet"))
    assert list(e.ids) == list(ids) and np.array_equal(e.vectors, vectors)
    with pytest.raises(StoreError, match="give the Parquet of its ids"):
        read_any(tmp_path / "img_emb_0.npy")


def test_clear_errors_for_tables_that_do_not_fit(tmp_path, data):
    ids, labels, vectors = data
    write_pandas(tmp_path / "t.parquet", ids, labels, vectors)
    with pytest.raises(StoreError, match="no id column 'path'.*--id-column"):
        read_any(tmp_path / "t.parquet", Columns(id="path"))
    pq.write_table(pa.table({"id": ["a", "b"], "v": [[1.0, 2.0], [1.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(StoreError, match="vectors of different lengths"):
        read_any(tmp_path / "ragged.parquet")
    pq.write_table(pa.table({"id": ["a"], "u": [[1.0]], "v": [[2.0]]}), tmp_path / "two.parquet")
    with pytest.raises(StoreError, match=r"several \(u, v\).*--embedding-column"):
        read_any(tmp_path / "two.parquet")


def test_cli_builds_searches_and_probes_a_foreign_table(tmp_path, data):
    ids, labels, vectors = data
    write_polars(tmp_path / "t.parquet", ids, labels, vectors)
    cols = ["--id-column", "image", "--embedding-column", "vec"]
    r = CliRunner().invoke(main, ["index", "build", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "idx"),
                                  "--index", "flat", *cols])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["search", str(tmp_path / "idx"), "--embeddings", str(tmp_path / "t.parquet"),
                                  "-k", "1", "--format", "json", *cols])
    rows = json.loads(r.output)
    assert r.exit_code == 0 and all(row["query_id"] == row["id"] for row in rows)
    r = CliRunner().invoke(main, ["probe", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "rep"), *cols])
    assert r.exit_code == 0, r.output


def test_searching_with_embeddings_does_not_import_torch(tmp_path, data):
    ids, labels, vectors = data
    write_pandas(tmp_path / "t.parquet", ids, labels, vectors)
    Index.build(embedding_blocks(tmp_path / "t.parquet"), index="flat").save(tmp_path / "idx")
    code = (
        "import sys\nfrom embedpipe.cli import main\n"
        f"try:\n    main(['search', {str(tmp_path / 'idx')!r}, '--embeddings', {str(tmp_path / 't.parquet')!r}])\n"
        "except SystemExit as e:\n    assert not e.code\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
