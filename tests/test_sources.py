"""Folders and manifests -> records with ids, labels and file stats."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from conftest import make_image

from embedpipe.errors import SourceError
from embedpipe.images.sources import open_source, read_manifest, scan_folder


def test_image_folder_labels_and_order(image_folder):
    records = scan_folder(image_folder)
    ids = [r.id for r in records]
    assert ids == sorted(ids) and len(ids) == 10
    assert ids[0] == "cats/000.jpg" and ids[-1] == "dogs/004.jpg"
    assert {r.label for r in records} == {"cats", "dogs"}
    assert all(r.label == r.id.split("/")[0] for r in records)
    r = records[0]
    st = os.stat(r.path)
    assert (r.size, r.mtime_ns) == (st.st_size, st.st_mtime_ns) and os.path.isabs(r.path)


def test_recursive_walk_and_extension_filter(tmp_path):
    make_image(tmp_path / "a" / "deep" / "x.JPEG")
    make_image(tmp_path / "a" / "y.webp")
    make_image(tmp_path / "b" / "z.tif")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "folder.jpg").mkdir()  # a directory named like an image
    records = scan_folder(tmp_path)
    assert [(r.id, r.label) for r in records] == [
        ("a/deep/x.JPEG", "a"), ("a/y.webp", "a"), ("b/z.tif", "b"),
    ]


def test_images_at_the_root_mean_no_labels(tmp_path):
    make_image(tmp_path / "top.png")
    make_image(tmp_path / "sub" / "inner.png")
    assert [r.label for r in scan_folder(tmp_path)] == [None, None]


def test_non_ascii_and_spaces_in_names(tmp_path):
    make_image(tmp_path / "chats" / "été à la plage.png")
    assert scan_folder(tmp_path)[0].id == "chats/été à la plage.png"


def test_broken_symlink_is_listed_with_unknown_stat(tmp_path):
    (tmp_path / "c").mkdir()
    os.symlink(tmp_path / "missing.jpg", tmp_path / "c" / "broken.jpg")
    (r,) = scan_folder(tmp_path)
    assert (r.id, r.size, r.mtime_ns) == ("c/broken.jpg", -1, -1)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest(tmp_path, suffix):
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "b.png")
    df = pd.DataFrame({"path": ["imgs/a.png", str(tmp_path / "imgs" / "b.png")], "label": ["x", None]})
    manifest = tmp_path / f"m{suffix}"
    df.to_csv(manifest, index=False) if suffix == ".csv" else df.to_parquet(manifest)
    records = open_source(manifest)
    assert [r.id for r in records] == ["imgs/a.png", str(tmp_path / "imgs" / "b.png")]
    assert [r.label for r in records] == ["x", None]
    assert records[0].path == str(tmp_path / "imgs" / "a.png") and records[0].size > 0


def test_manifest_with_ids(tmp_path):
    make_image(tmp_path / "a.png")
    pd.DataFrame({"path": ["a.png"], "id": ["img-1"]}).to_csv(tmp_path / "m.csv", index=False)
    assert read_manifest(tmp_path / "m.csv")[0].id == "img-1"


@pytest.mark.parametrize(
    "df, match",
    [
        (pd.DataFrame({"file": ["a.png"]}), "no 'path' column"),
        (pd.DataFrame({"path": ["a.png", "b.png"], "id": ["x", "x"]}), "repeats ids"),
    ],
)
def test_bad_manifests(tmp_path, df, match):
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SourceError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_missing_source(tmp_path):
    with pytest.raises(SourceError, match="neither an image folder nor a manifest"):
        open_source(tmp_path / "nope")


# --- URIs: pyarrow file systems (file:// here; s3://, gs://, hdfs:// the same way) ----


def test_a_folder_uri_lists_what_the_folder_does(image_folder):
    (image_folder / "dogs" / "notes.txt").write_text("not listed")
    make_image(image_folder / "cats" / "sub dir" / "é #1 100%.png", seed=3)  # quoting in URIs
    local = scan_folder(image_folder)
    remote = open_source(image_folder.as_uri())
    assert [(r.id, r.label, r.size, r.mtime_ns) for r in remote] == [
        (r.id, r.label, r.size, r.mtime_ns) for r in local
    ]
    assert all(r.path.startswith("file://") for r in remote)


def test_images_read_through_a_uri_decode_like_local_files(image_folder):
    from embedpipe.images.decode import Decoded, decode_file
    from embedpipe.images.preprocess import Preprocessing

    p = Preprocessing(resize_size=40, crop_size=32)
    make_image(image_folder / "cats" / "odd #name?.png", seed=4)
    for r in open_source(image_folder.as_uri()):
        a = decode_file(r.path, p, max_pixels=10**7, mode="full")
        b = decode_file(str(image_folder / r.id), p, max_pixels=10**7, mode="full")
        assert isinstance(a, Decoded) and (a.pixels == b.pixels).all() and a.content_hash == b.content_hash
    missing = decode_file((image_folder / "cats" / "gone.jpg").as_uri(), p, max_pixels=10**7, mode="full")
    assert missing.error_type == "not_found"


def test_bad_uris_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="cannot list"):
        open_source((tmp_path / "nowhere").as_uri())
    with pytest.raises(SourceError, match="cannot list"):
        open_source("nosuchscheme://bucket/images")


def test_manifest_rows_may_be_uris(tmp_path, image_folder):
    uri = (image_folder / "cats" / "000.jpg").as_uri()
    pd.DataFrame({"path": [uri], "label": ["cat"]}).to_csv(tmp_path / "m.csv", index=False)
    (r,) = read_manifest(tmp_path / "m.csv")
    assert (r.id, r.path, r.label, r.size) == (uri, uri, "cat", -1)
