"""The Parquet store: round trips, readers, crash recovery, locks and validated reads."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from embedpipe.errors import MetadataMismatchError, OutputLockedError, StoreError
from embedpipe.store import (
    ERRORS_SCHEMA,
    META_KEY,
    READ_BATCH_ROWS,
    DatasetWriter,
    dataset_info,
    embeddings_table,
    iter_embedding_blocks,
    list_parts,
    read_embeddings,
    read_errors,
    sidecar,
)

DIM = 8
META = {"backbone": "toy", "layer": "gap", "dim": DIM, "weights": {"name": "none", "pretrained": False},
        "preprocessing": {"crop_size": 4}, "embedding_dtype": "float32", "versions": {"x": "1"}}


def rows(start: int, n: int, schema: pa.Schema, dim: int = DIM, dtype=np.float32) -> tuple[pa.Table, np.ndarray]:
    vectors = (np.arange(start * dim, (start + n) * dim, dtype=np.float32).reshape(n, dim) / 7).astype(dtype)
    table = embeddings_table(
        ids=[f"img/{i:04d}.jpg" for i in range(start, start + n)],
        labels=["even" if i % 2 == 0 else None for i in range(start, start + n)],
        vectors=vectors, width=[10] * n, height=[20] * n, size=[100 + i for i in range(start, start + n)],
        mtime_ns=[5] * n, content_hash=["h"] * n, schema=schema,
    )
    return table, vectors


def write(out: Path, batches: list[tuple[int, int]], *, part_rows=4, meta=META) -> np.ndarray:
    with DatasetWriter(out, meta, part_rows=part_rows) as w:
        vecs = []
        for start, n in batches:
            t, v = rows(start, n, w.schema)
            w.append(t)
            vecs.append(v)
    return np.concatenate(vecs)


def test_round_trip(tmp_path):
    out = tmp_path / "emb"
    expected = write(out, [(0, 3), (3, 3), (6, 4)])
    e = read_embeddings(out)
    assert e.vectors.dtype == np.float32 and e.vectors.flags.c_contiguous
    np.testing.assert_array_equal(e.vectors, expected)
    assert e.ids.tolist() == [f"img/{i:04d}.jpg" for i in range(10)]
    assert e.labels.tolist() == ["even" if i % 2 == 0 else None for i in range(10)]
    assert e.meta["backbone"] == "toy" and e.meta["format_version"] == 1
    parts = list_parts(out)
    # a part is committed once its journal reaches part_rows: 3+3 rows, then 4
    assert [pq.read_metadata(p).num_rows for p in parts] == [6, 4]
    assert json.loads(pq.read_schema(parts[0]).metadata[META_KEY])["dim"] == DIM
    assert pq.read_schema(parts[0]).field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), DIM)


def test_pandas_polars_duckdb_and_pyarrow_read_the_folder_as_the_embeddings(tmp_path):
    out = tmp_path / "emb"
    with DatasetWriter(out, META, part_rows=4) as w:
        w.append(rows(0, 6, w.schema)[0])
        w.append_errors(pa.Table.from_pylist(
            [{"id": "bad.jpg", "path": "/x/bad.jpg", "error_type": "truncated", "message": "m", "size": 1, "mtime_ns": 1}],
            schema=ERRORS_SCHEMA))
    # the folder itself, no glob: each reader sees the 6 embeddings, none of the error rows
    ids = [f"img/{i:04d}.jpg" for i in range(6)]
    assert sorted(ds.dataset(out, format="parquet").to_table().column("id").to_pylist()) == ids
    assert sorted(pd.read_parquet(out)["id"]) == ids
    assert sorted(pl.read_parquet(out)["id"].to_list()) == ids
    assert pl.read_parquet(out).schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert sorted(r[0] for r in duckdb.sql(f"select id from read_parquet('{out}')").fetchall()) == ids
    assert duckdb.sql(f"select len(embedding) from read_parquet('{out}') limit 1").fetchall() == [(DIM,)]
    errors = read_errors(out)
    assert errors[["id", "error_type"]].values.tolist() == [["bad.jpg", "truncated"]]
    info = dataset_info(out)
    assert (info["rows"], info["errors"], info["labels"], info["unlabelled"]) == (6, 1, {"even": 3}, 3)


def test_float16_storage(tmp_path):
    out = tmp_path / "emb"
    meta = {**META, "embedding_dtype": "float16"}
    with DatasetWriter(out, meta) as w:
        t, v = rows(0, 5, w.schema, dtype=np.float16)
        w.append(t)
    assert pq.read_schema(list_parts(out)[0]).field("embedding").type.value_type == pa.float16()
    e = read_embeddings(out)
    assert e.vectors.dtype == np.float32
    np.testing.assert_array_equal(e.vectors, v.astype(np.float32))


def test_blocks_cover_the_dataset(tmp_path):
    out = tmp_path / "emb"
    expected = write(out, [(0, 5), (5, 5)], part_rows=5)
    blocks = list(iter_embedding_blocks(out))
    assert [len(b.ids) for b in blocks] == [5, 5]
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in blocks]), expected)


# --- crash safety --------------------------------------------------------------------


def crash(w: DatasetWriter) -> None:
    """What SIGKILL leaves: journals on disk, nothing flushed, the lock released."""
    w._unlock()


def test_journal_rows_survive_a_crash_even_with_a_torn_last_batch(tmp_path):
    out = tmp_path / "emb"
    w = DatasetWriter(out, META, part_rows=100).__enter__()
    for start in (0, 3, 6):
        w.append(rows(start, 3, w.schema)[0])
    crash(w)
    (journal,) = (sidecar(out) / "journal" / "embeddings").glob("*.arrows")
    data = journal.read_bytes()
    journal.write_bytes(data[:-40])  # the third batch was being written when killed
    assert list_parts(out) == []
    with DatasetWriter(out, META, part_rows=100):
        pass
    e = read_embeddings(out)
    assert e.ids.tolist() == [f"img/{i:04d}.jpg" for i in range(6)]
    assert not list((sidecar(out) / "journal" / "embeddings").glob("*.arrows"))


def test_superseded_files_left_by_a_crash_are_removed(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4), (4, 4)], part_rows=4)
    first = list_parts(out)[0]
    backup = tmp_path / "backup.parquet"
    shutil.copy(first, backup)
    with DatasetWriter(out, META, part_rows=4) as w:
        assert w.drop({"img/0001.jpg"}) == (1, 0)
    shutil.copy(backup, first)  # as if killed between the rename and the delete
    with DatasetWriter(out, META, part_rows=4):
        pass
    e = read_embeddings(out)
    assert sorted(e.ids.tolist()) == [f"img/{i:04d}.jpg" for i in range(8) if i != 1]


def test_temporary_files_are_never_parts(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4)])
    (out / ".part-000009.parquet.abc.tmp").write_bytes(b"half a file")
    assert len(list_parts(out)) == 1
    with DatasetWriter(out, META):
        pass
    assert not list(out.glob(".*.tmp"))


# --- locks ---------------------------------------------------------------------------


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "emb"
    with DatasetWriter(out, META):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            DatasetWriter(out, META).__enter__()


def test_lock_of_a_killed_job_is_released(tmp_path):
    out = tmp_path / "emb"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from embedpipe.store import DatasetWriter
            w = DatasetWriter({str(out)!r}, {META!r}).__enter__()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"):
            DatasetWriter(out, META).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DatasetWriter(out, META):  # a stale lock: the kernel released it with the process
        pass


# --- provenance and validation -------------------------------------------------------


def test_different_provenance_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4)])
    other = {**META, "backbone": "other", "versions": {"x": "2"}}
    with pytest.raises(MetadataMismatchError, match='backbone: "toy" \\(existing\\) != "other"'):
        DatasetWriter(out, other).__enter__()
    with DatasetWriter(out, {**META, "versions": {"x": "2"}}):  # run details may differ
        pass
    with DatasetWriter(out, other, overwrite=True) as w:
        w.append(rows(0, 2, w.schema)[0])
    assert read_embeddings(out).meta["backbone"] == "other" and len(read_embeddings(out).ids) == 2


def _rewrite_part(part: Path, fn) -> None:
    table = pq.read_table(part)
    table = fn(table)
    pq.write_table(table, part)


def test_nan_rows_are_refused_naming_the_file(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4)])
    part = list_parts(out)[0]

    def poison(t):
        v = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        v[2, 3] = np.nan
        emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM)
        return t.set_column(2, pa.field("embedding", emb.type), emb)

    _rewrite_part(part, poison)
    with pytest.raises(StoreError, match=f"{part.name}.*NaN or inf.*img/0002.jpg"):
        read_embeddings(out)


@pytest.mark.parametrize("read", [read_embeddings, lambda out: list(iter_embedding_blocks(out))])
def test_a_part_read_in_batches_keeps_every_row_and_checks_each_batch(tmp_path, read):
    # a part of more rows than one read batch: values near float32's limit make a batch
    # sum overflow with every value finite (not an error), and a NaN deep in a later
    # batch is still found and named
    n = READ_BATCH_ROWS * 2 + 17
    out = tmp_path / "emb"
    expected = write(out, [(0, n)], part_rows=n)
    assert len(list_parts(out)) == 1
    huge = expected.copy()
    huge[:5] = 3e38
    part = list_parts(out)[0]

    def with_vectors(v):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM)
        return lambda t: t.set_column(2, pa.field("embedding", emb.type), emb)

    _rewrite_part(part, with_vectors(huge))
    got = read_embeddings(out)
    np.testing.assert_array_equal(got.vectors, huge)
    assert got.ids.tolist() == [f"img/{i:04d}.jpg" for i in range(n)]
    poisoned = huge.copy()
    poisoned[READ_BATCH_ROWS + 100, 1] = np.inf
    _rewrite_part(part, with_vectors(poisoned))
    with pytest.raises(StoreError, match=f"1 rows with NaN or inf.*img/{READ_BATCH_ROWS + 100:04d}.jpg"):
        read(out)


def test_duplicate_ids_across_parts_are_refused(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4)])
    part = list_parts(out)[0]
    shutil.copy(part, out / "part-000001.parquet")
    with pytest.raises(StoreError, match="repeats ids"):
        read_embeddings(out)


def test_parts_made_differently_are_refused(tmp_path):
    out = tmp_path / "emb"
    write(out, [(0, 4)])
    part = list_parts(out)[0]
    meta = json.loads(pq.read_schema(part).metadata[META_KEY])
    meta["weights"] = {"name": "IMAGENET1K_V1", "pretrained": True}
    table = pq.read_table(part).replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, out / "part-000001.parquet")
    with pytest.raises(MetadataMismatchError, match="part-000001.parquet.*weights"):
        read_embeddings(out)


def test_empty_or_missing_dataset(tmp_path):
    with pytest.raises(StoreError, match="do not exist"):
        read_embeddings(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no embedding parts"):
        read_embeddings(tmp_path / "empty")


def test_foreign_parquet_is_refused(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "part-000000.parquet")
    with pytest.raises(StoreError, match="no embedpipe metadata"):
        read_embeddings(tmp_path)


def test_journal_append_is_visible_to_another_process(tmp_path):
    """A journal append reaches the OS at once (no user-space buffer to lose on SIGKILL)."""
    out = tmp_path / "emb"
    w = DatasetWriter(out, META, part_rows=100).__enter__()
    w.append(rows(0, 2, w.schema)[0])
    (journal,) = (sidecar(out) / "journal" / "embeddings").glob("*.arrows")
    got = subprocess.run(
        [sys.executable, "-c", f"from embedpipe.store import _Journal; from pathlib import Path; "
                               f"print(_Journal.recover(Path({str(journal)!r})).num_rows)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert got == "2"
    w.__exit__(None, None, None)


def test_a_folder_in_the_old_layout_is_read_and_moved_to_the_new_one(tmp_path):
    """Folders written before the sidecar kept the bookkeeping inside: still readable, and
    the next writer moves it beside without losing or repeating a row."""
    out = tmp_path / "emb"
    w = DatasetWriter(out, META, part_rows=100).__enter__()
    w.append(rows(0, 4, w.schema)[0])
    w.errors.append(pa.Table.from_pylist(
        [{"id": "bad.jpg", "path": "/x/bad.jpg", "error_type": "truncated", "message": "m", "size": 1, "mtime_ns": 1}],
        schema=ERRORS_SCHEMA))
    w.errors.flush()
    w.embeddings.flush()
    w.append(rows(4, 2, w.schema)[0])  # left in the journal, as by a killed job
    crash(w)
    # rebuild the old layout from what the writer left
    side = sidecar(out)
    (out / "_journal").mkdir()
    for j in (side / "journal" / "embeddings").glob("*.arrows"):
        j.rename(out / "_journal" / j.name)
    (side / "errors").rename(out / "_errors")
    (side / "dataset.json").rename(out / "_embedpipe.json")
    (out / "_lock").write_text("pid 1")
    shutil.rmtree(side)

    assert read_errors(out)["id"].tolist() == ["bad.jpg"]
    assert dataset_info(out)["errors"] == 1
    assert sorted(read_embeddings(out).ids) == [f"img/{i:04d}.jpg" for i in range(4)]
    with DatasetWriter(out, META, part_rows=100) as w:
        assert sorted(w.ids(errors=False).to_pylist()) == [f"img/{i:04d}.jpg" for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in list_parts(out)]
    assert sorted(read_embeddings(out).ids) == [f"img/{i:04d}.jpg" for i in range(6)]
    assert read_errors(out)["id"].tolist() == ["bad.jpg"]
    assert sorted(pl.read_parquet(out)["id"].to_list()) == [f"img/{i:04d}.jpg" for i in range(6)]


def test_a_dataset_moved_without_its_sidecar_keeps_its_rows_and_identity(tmp_path):
    write(tmp_path / "emb", [(0, 4)])
    (tmp_path / "emb").rename(tmp_path / "moved")
    with DatasetWriter(tmp_path / "moved", META) as w:
        assert len(w.ids(errors=False)) == 4
    with pytest.raises(MetadataMismatchError, match="dim"):
        DatasetWriter(tmp_path / "moved", {**META, "dim": DIM * 2}).__enter__()
