"""Parquet image tables (the Hugging Face layout) -> Samples, against tables written here."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedpipe.errors import SourceError
from embedpipe.images.imagetables import (
    check_table,
    expand_tables,
    read_table,
    table_name,
)
from embedpipe.images.streams import common_root

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def encoded(seed: int, fmt: str = "PNG") -> bytes:
    """A small random image's file bytes, as PIL writes them."""
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, columns: dict, *, schema: pa.Schema | None = None, hf_features: dict | None = None,
          row_group_size: int | None = None) -> Path:
    table = pa.table(columns, schema=schema)
    if hf_features is not None:  # the metadata `datasets` writes
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": hf_features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def rows(path, **kw) -> list[tuple]:
    """(key, label, data, failure type or None) of each Sample."""
    kw.setdefault("image_column", "image")
    return [(s.key, s.label, s.data, s.failure and s.failure.error_type) for s in read_table(str(path), **kw)]


# --- layouts, keys, labels ------------------------------------------------------------


@pytest.mark.parametrize("bytes_type", [pa.binary(), pa.large_binary()])
def test_a_binary_column_round_trips_with_row_numbers_as_keys(tmp_path, bytes_type):
    images = [encoded(0), encoded(1, "JPEG"), encoded(2)]
    path = write(tmp_path / "t.parquet", {"image": pa.array(images, bytes_type), "other": [1.0, 2.0, 3.0]})
    samples = list(read_table(str(path), image_column="image"))
    assert [(s.key, s.member, s.label, s.data, s.failure) for s in samples] == [
        (str(i), f"row={i}", None, data, None) for i, data in enumerate(images)
    ]
    assert [Image.open(io.BytesIO(s.data)).format for s in samples] == ["PNG", "JPEG", "PNG"]


def test_hf_image_structs_with_ids_and_labels(tmp_path):
    images = [encoded(0, "JPEG"), encoded(1)]
    path = write(tmp_path / "t.parquet", {
        "img": pa.array([{"bytes": images[0], "path": "a.jpg"}, {"bytes": images[1], "path": None}], HF_IMAGE),
        "name": ["cat-1", "dog-7"],
        "species": ["cat", None],
    })
    assert rows(path, image_column="img", id_column="name", label_column="species") == [
        ("cat-1", "cat", images[0], None), ("dog-7", None, images[1], None),
    ]


def test_integer_ids_become_strings(tmp_path):
    path = write(tmp_path / "t.parquet", {"image": [encoded(0), encoded(1)], "id": [10, 3]})
    assert [r[0] for r in rows(path, id_column="id")] == ["10", "3"]


def test_class_label_names_come_from_the_hf_metadata(tmp_path):
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    columns = {"image": [encoded(i) for i in range(4)], "label": pa.array([1, 0, -1, None], pa.int64())}
    named = write(tmp_path / "named.parquet", columns, hf_features=features)
    assert [r[1] for r in rows(named, label_column="label")] == ["dog", "cat", None, None]  # -1: unlabelled
    for other in [None, {"label": {"dtype": "int64", "_type": "Value"}}, {"label": [{"_type": "Value"}]}]:
        plain = write(tmp_path / "plain.parquet", columns, hf_features=other)
        assert [r[1] for r in rows(plain, label_column="label")] == ["1", "0", "-1", None]


def test_struct_rows_without_bytes_read_their_path(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encoded(0))
    (tmp_path / "elsewhere.jpg").write_bytes(encoded(1, "JPEG"))
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    path = write(tmp_path / "tables" / "t.parquet", {"image": pa.array([
        {"bytes": None, "path": "../imgs/a.png"},  # relative to the table's folder
        {"bytes": None, "path": str(tmp_path / "elsewhere.jpg")},
        {"bytes": None, "path": (tmp_path / "imgs" / "a.png").as_uri()},
        {"bytes": None, "path": "gone.png"},
        {"bytes": None, "path": "../imgs"},  # a folder
        {"bytes": None, "path": "../imgs/empty.png"},
        {"bytes": None, "path": None},
        None,
    ], HF_IMAGE)})
    got = list(read_table(str(path), image_column="image"))
    assert [s.data for s in got[:3]] == [encoded(0), encoded(1, "JPEG"), encoded(0)]
    assert [s.failure.error_type for s in got[3:]] == [
        "not_found", "unreadable", "empty_file", "empty_file", "empty_file"]
    assert got[3].failure.message.startswith("gone.png: ") and got[7].failure.message == "no image bytes in row 7"


def test_null_and_empty_images_are_failures_that_keep_their_labels(tmp_path, monkeypatch):
    write(tmp_path / "t.parquet", {"image": pa.array([None, b"", encoded(0)], pa.binary()), "y": list("abc")})
    monkeypatch.chdir(tmp_path)
    got = list(read_table("t.parquet", image_column="image", label_column="y"))  # a relative path
    assert [(s.key, s.label, s.failure and s.failure.error_type, s.data) for s in got] == [
        ("0", "a", "empty_file", None), ("1", "b", "empty_file", None), ("2", "c", None, encoded(0)),
    ]
    assert [s.failure.message for s in got[:2]] == ["no image bytes in row 0", "empty image bytes in row 1"]


def test_null_and_repeated_ids_are_failures_with_unique_keys(tmp_path):
    path = write(tmp_path / "t.parquet", {"image": [encoded(i) for i in range(4)], "id": ["a", None, "a", "b"]})
    got = list(read_table(str(path), image_column="image", id_column="id"))
    assert [(s.key, s.failure and s.failure.error_type) for s in got] == [
        ("a", None), ("#row=1", "unreadable"), ("a#row=2", "unreadable"), ("b", None),
    ]
    assert "row 1" in got[1].failure.message and "repeated" in got[2].failure.message
    assert got[2].member == "row=2" and got[3].data == encoded(3)


def test_done_keys_are_skipped(tmp_path):
    path = write(tmp_path / "t.parquet", {"image": [encoded(i) for i in range(5)], "id": list("abcad")})
    assert [r[0] for r in rows(path, done={"1", "3"})] == ["0", "2", "4"]
    # an id done earlier still counts as seen: its repeat is reported, not embedded
    assert [r[0] for r in rows(path, id_column="id", done={"a", "c"})] == ["b", "a#row=3", "d"]


def test_batches_are_bounded_and_only_needed_columns_are_read(tmp_path, monkeypatch):
    images = [encoded(i) for i in range(7)]
    path = write(tmp_path / "t.parquet", {"image": images, "label": list("xyzxyzx"), "big": [b"x" * 999] * 7},
                 row_group_size=3)
    seen = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self, **kw):
        for batch in iter_batches(self, **kw):
            seen.append((batch.num_rows, batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    got = rows(path, label_column="label", batch_rows=2)
    assert got == [(str(i), "xyzxyzx"[i], images[i], None) for i in range(7)]
    assert max(n for n, _ in seen) == 2 and {tuple(c) for _, c in seen} == {("image", "label")}


# --- columns that do not fit: errors before any row --------------------------------


@pytest.mark.parametrize("kw, message", [
    ({"image_column": "img"}, r"no image column 'img' \(columns: image, photo_id, label, n\)\. The images"),
    ({"image_column": "n"}, r"column 'n' .* holds int64, not images.*probably in 'image'"),
    ({"image_column": "image", "id_column": "photoid"}, r"no id column 'photoid'.*Did you mean photo_id"),
    ({"image_column": "image", "label_column": "labels"}, r"no label column 'labels'.*Did you mean label"),
])
def test_columns_that_do_not_fit_are_source_errors(tmp_path, kw, message):
    path = str(write(tmp_path / "t.parquet", {
        "image": pa.array([{"bytes": encoded(0), "path": None}], HF_IMAGE),
        "photo_id": ["p"], "label": ["l"], "n": [1],
    }))
    with pytest.raises(SourceError, match=message):
        check_table(path, **kw)
    with pytest.raises(SourceError, match=message):
        next(read_table(path, **kw))


def test_a_table_without_image_bytes_says_so(tmp_path):
    path = str(write(tmp_path / "t.parquet", {"file": ["a.png"]}))
    with pytest.raises(SourceError, match="No column holds image bytes"):
        check_table(path, image_column="image", id_column=None, label_column=None)


# --- broken files ---------------------------------------------------------------------


def test_files_that_cannot_be_opened_are_one_failure(tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all" * 20)
    (tmp_path / "empty.parquet").write_bytes(b"")
    for name, error_type in [("garbage", "unreadable"), ("empty", "unreadable"), ("missing", "not_found")]:
        path = str(tmp_path / f"{name}.parquet")
        check_table(path, image_column="image")  # read_table reports it: one shard costs its rows
        (s,) = read_table(path, image_column="image")
        assert (s.key, s.member, s.data, s.failure.error_type) == ("", "", None, error_type)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_permission_denied(tmp_path):
    path = write(tmp_path / "t.parquet", {"image": [encoded(0)]})
    path.chmod(0)
    (s,) = read_table(str(path), image_column="image")
    assert (s.key, s.failure.error_type) == ("", "permission_denied")


def test_a_damaged_row_group_ends_the_table_after_the_rows_before_it(tmp_path):
    images = [encoded(i) for i in range(30)]
    path = write(tmp_path / "t.parquet", {"image": images}, row_group_size=10)
    second = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    raw[second.data_page_offset + 4: second.data_page_offset + 400] = b"\xff" * 396
    path.write_bytes(bytes(raw))
    got = list(read_table(str(path), image_column="image", batch_rows=4))  # batches straddle groups
    assert [(s.key, s.data) for s in got[:10]] == [(str(i), images[i]) for i in range(10)]
    (last,) = got[10:]
    assert (last.key, last.member, last.failure.error_type) == ("", "row=10", "truncated")
    assert "from row 10" in last.failure.message


# --- finding tables: files, folders, globs, URIs ---------------------------------------


@pytest.fixture
def hf_repo(tmp_path) -> Path:
    """A dataset laid out as on the Hub: data/<split>-NNNNN-of-NNNNN.parquet."""
    for split, n in [("train", 2), ("test", 1)]:
        for i in range(n):
            write(tmp_path / "data" / f"{split}-{i:05d}-of-{n:05d}.parquet", {"image": [encoded(i)]})
    (tmp_path / "README.md").write_text("not a table")
    (tmp_path / "data" / "notes.txt").write_text("not a table")
    return tmp_path


def test_a_folder_lists_its_tables_recursively_and_sorted(hf_repo):
    tables = expand_tables(hf_repo)
    assert tables == [f"{hf_repo.as_posix()}/data/{n}.parquet"
                      for n in ["test-00000-of-00001", "train-00000-of-00002", "train-00001-of-00002"]]
    root = common_root(tables)
    assert root == f"{hf_repo.as_posix()}/data"
    assert [table_name(t, root) for t in tables] == [
        "test-00000-of-00001", "train-00000-of-00002", "train-00001-of-00002"]


@pytest.mark.parametrize("paths, root", [
    (["/d/a/b/x.parquet", "/d/a/y.parquet"], "/d/a"),
    (["/d/a/x.parquet"], "/d/a"),
    (["/d/ab/x.parquet", "/d/a/y.parquet"], "/d"),  # by folder, not by character
    (["s3://bucket/t/x.parquet", "s3://bucket/v/y.parquet"], "s3://bucket"),
])
def test_common_root(paths, root):
    assert common_root(paths) == root


def test_globs_and_single_files(hf_repo, monkeypatch):
    monkeypatch.chdir(hf_repo)
    train = expand_tables("data/train-*.parquet")
    assert [Path(t).name for t in train] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert all(os.path.isabs(t) for t in train)
    write(hf_repo / "top.parquet", {"image": [encoded(0)]})  # '**' matches no folder...
    write(hf_repo / "a" / "b" / "c" / "deep.parquet", {"image": [encoded(0)]})  # ...or several
    assert expand_tables(hf_repo / "**" / "*.parquet") == expand_tables(hf_repo)
    assert len(expand_tables(hf_repo)) == 5
    (single,) = expand_tables(Path("data") / "test-00000-of-00001.parquet")
    assert table_name(single, common_root([single])) == "test-00000-of-00001"


@pytest.mark.parametrize("spec, message", [
    ("*.parquet", "no files match"),  # '*' stays in its folder: the tables are in data/
    ("data/val-*.parquet", "no files match"),
    ("nowhere", "cannot list .*nowhere"),
    ("data/nowhere/*.parquet", "no files match"),
    ("empty", r"no \.parquet files \(subfolders too\) in"),
])
def test_nothing_to_read_is_a_source_error(hf_repo, monkeypatch, spec, message):
    monkeypatch.chdir(hf_repo)
    (hf_repo / "empty").mkdir()
    with pytest.raises(SourceError, match=message):
        expand_tables(spec)


def test_tables_behind_a_file_uri(tmp_path):
    images = [encoded(0), encoded(1, "JPEG")]
    write(tmp_path / "my data" / "part #1.parquet", {"image": images})
    write(tmp_path / "my data" / "sub" / "part 2.parquet", {"image": images[:1]})
    uri = (tmp_path / "my data").as_uri()
    tables = expand_tables(uri)
    assert all(t.startswith("file://") for t in tables)
    assert [table_name(t, common_root(tables)) for t in tables] == ["part #1", "sub/part 2"]
    assert expand_tables(f"{uri}/sub/*.parquet") == tables[1:]
    got = list(read_table(tables[0], image_column="image"))
    assert [(s.key, s.member, s.data) for s in got] == [("0", "row=0", images[0]),
                                                        ("1", "row=1", images[1])]
    (missing,) = read_table(f"{uri}/gone.parquet", image_column="image")
    assert missing.failure.error_type == "not_found"
    with pytest.raises(SourceError, match="cannot list"):
        expand_tables("nosuchscheme://bucket/tables")
