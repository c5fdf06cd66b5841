"""WebDataset tar shards: naming them (files, folders, braces, globs, URIs) and streaming
them into samples, whole or cut short. Shards are written here with ``tarfile`` from
real image bytes; expectations come from the members written, and for cut shards from
the member offsets that ``tarfile`` reports when it reads the whole file."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedpipe.errors import SourceError
from embedpipe.images.shards import (
    _expand_braces,
    expand_shards,
    is_shard_spec,
    read_shard,
    shard_name,
)
from embedpipe.images.streams import common_root


def image_bytes(fmt: str, seed: int = 0, size: tuple[int, int] = (24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, members: list, *, mode: str = "w") -> Path:
    """``members``: ``(name, bytes)`` in archive order, or a TarInfo of a non-file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            info = tarfile.TarInfo(m[0])
            info.size = len(m[1])
            tar.addfile(info, io.BytesIO(m[1]))
    return path


def rows(samples) -> list[tuple]:
    """(key, member, label, data, None or (error type, message)) per sample."""
    return [
        (s.key, s.member, s.label, s.data, s.failure and (s.failure.error_type, s.failure.message))
        for s in samples
    ]


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


JPG, PNG, PNG2 = image_bytes("JPEG", 1), image_bytes("PNG", 2), image_bytes("PNG", 3)
WEBP = image_bytes("WEBP", 4)
LONG = "deep/" + "x" * 120  # past ustar's 100 characters: tarfile writes a pax header


def test_samples_come_in_shard_order_with_their_bytes_and_labels(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [
        folder("a"),
        ("a/000.jpg", JPG), ("a/000.cls", b" 7\n"),
        ("a/001.png", PNG), ("a/001.json", json.dumps({"label": 3, "w": 24}).encode()),
        ("b/002.seg.jpg", JPG), ("b/002.PNG", PNG2), ("b/002.txt", b" a dog \n"),
        ("b/002.npy", b"xx"),
        ("./003.webp", WEBP), ("003.cls", b""), ("003.json", b"{not json"), ("003.txt", b"cat"),
        ("._004.jpg", b"AppleDouble"),  # macOS metadata: no sample
        ("004.png", PNG2), ("004.jpg", JPG), ("004.json", json.dumps({"cls": "bird"}).encode()),
        (f"{LONG}.webp", WEBP),
    ])
    assert rows(read_shard(str(shard))) == [
        ("a/000", "a/000.jpg", "7", JPG, None),
        ("a/001", "a/001.png", "3", PNG, None),
        ("b/002", "b/002.PNG", "a dog", PNG2, None),  # a plain extension beats a .seg.jpg mask
        ("003", "./003.webp", "cat", WEBP, None),  # empty cls, broken json: on to the txt
        ("004", "004.jpg", "bird", JPG, None),  # jpg before png
        (LONG, f"{LONG}.webp", None, WEBP, None),
    ]


def test_photos_stream_byte_exact_from_compressed_shards(tmp_path):
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image is not installed (its sample photos)")
    data = Path(spec.submodule_search_locations[0]) / "data"
    photos = [(name, (data / name).read_bytes()) for name in ["rocket.jpg", "chelsea.png"]]
    for name, mode in [("p.tar.gz", "w:gz"), ("p.tar.bz2", "w:bz2")]:  # tarfile detects either
        shard = write_shard(tmp_path / name, [*photos, (".hidden.json", b"{}")], mode=mode)
        expected = [(n.partition(".")[0], n, None, b, None) for n, b in photos]
        assert rows(read_shard(str(shard))) == expected


def test_problems_become_failure_rows_in_place(tmp_path):
    link = tarfile.TarInfo("c.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
    shard = write_shard(tmp_path / "s.tar", [
        ("a.jpg", JPG), ("a.cls", b"1"),
        ("nolabel.cls", b"2"), ("nolabel.seg.npy", b"\0"),  # no image member
        ("b.png", b""), ("b.cls", b"3"),  # an empty image
        link,  # a link is no image either: nothing comes of it
        ("a.png", PNG),  # `a` again, after other keys
        ("d.webp", WEBP),
    ])
    got = list(read_shard(str(shard)))
    assert [(s.key, s.member, s.label, s.data) for s in got] == [
        ("a", "a.jpg", "1", JPG), ("nolabel", "nolabel.cls", "2", None), ("b", "b.png", "3", None),
        ("a", "a.png", None, None), ("d", "d.webp", None, WEBP),
    ]
    kinds = [s.failure and s.failure.error_type for s in got]
    assert kinds == [None, "not_an_image", "empty_file", "unreadable", None]
    assert "it has nolabel.cls, nolabel.seg.npy; looked for members ending in .jpg, .jpeg" in (
        got[1].failure.message
    )
    assert got[3].failure.message.startswith(f"key repeated in shard {str(shard)!r}")


def test_done_keys_are_neither_yielded_nor_read(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "s.tar", [
        ("a.jpg", JPG), ("a.cls", b"1"), ("b.png", PNG), ("b.cls", b"2"), ("c.jpg", JPG),
        ("a.png", PNG),
    ])
    read = []
    extractfile = tarfile.TarFile.extractfile
    monkeypatch.setattr(
        tarfile.TarFile, "extractfile", lambda tar, m: read.append(m.name) or extractfile(tar, m)
    )
    assert [(s.key, s.data) for s in read_shard(str(shard), done={"a", "c"})] == [("b", PNG)]
    assert read == ["b.png", "b.cls"]  # the repeat of a done key is done too
    # a break inside a done sample is the shard's: that sample was recorded before
    with tarfile.open(shard) as tar:
        inside_c = tar.getmember("c.jpg").offset_data + 10
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:inside_c])
    got = rows(read_shard(str(cut), done={"a", "c"}))
    assert [(key, data or failure[0]) for key, _, _, data, failure in got] == [
        ("b", PNG), ("", "truncated")
    ]


def cut(shard: Path, size: int) -> Path:
    out = shard.with_name(f"cut{size}.tar")
    out.write_bytes(shard.read_bytes()[:size])
    return out


# where to cut, from the members' (header offset, data offset, size) and the archive's end
CUTS = {
    "empty file": lambda m, end: 0,
    "first header": lambda m, end: 100,
    "data of b's image": lambda m, end: m["b.png"][1] + 10,
    "header of b's label": lambda m, end: m["b.cls"][0] + 300,
    "padding after b's label": lambda m, end: m["b.cls"][1] + 1 + 100,
    "at c's first header": lambda m, end: m["c.jpg"][0],
    "just past c's first header": lambda m, end: m["c.jpg"][0] + 512,
    "half the file": lambda m, end: end // 2,
    "end-of-archive block": lambda m, end: end + 200,
    "after the end block": lambda m, end: end + 512,  # whole: the rest is padding
}


@pytest.mark.parametrize("where", CUTS)
def test_a_cut_shard_yields_the_samples_known_whole_then_one_truncated_row(tmp_path, where):
    samples = [
        ("a", [("a.jpg", JPG), ("a.cls", b"1")]), ("b", [("b.png", PNG), ("b.cls", b"2")]),
        ("c", [("c.jpg", JPG), ("c.json", b'{"label": "x"}')]), ("d", [("d.webp", WEBP)]),
    ]
    labels = {"a": "1", "b": "2", "c": "x", "d": None}
    whole = write_shard(tmp_path / "s.tar", [m for _, ms in samples for m in ms])
    with tarfile.open(whole) as tar:  # random access: reads the whole file
        members = {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}
    last = members["d.webp"]
    end = last[1] + -(-last[2] // 512) * 512
    size = CUTS[where](members, end)
    # a sample is known whole once the next sample's first header (or the end block) was read
    starts = [members[ms[0][0]][0] for _, ms in samples] + [end]
    read = [k for k, (_, ms) in enumerate(samples) if size >= starts[k] + 512]
    known = [k for k in read if size >= starts[k + 1] + 512]
    expected = [(key, ms[0][0], labels[key], ms[0][1], None) for key, ms in samples[: len(known)]]
    got = rows(read_shard(str(cut(whole, size))))
    assert got[: len(expected)] == expected
    if len(known) == len(samples):
        assert len(got) == len(expected)
        return
    (key, _, label, data, (kind, message)), = got[len(expected):]
    broken = samples[read[-1]][0] if read else ""
    assert (key, label, data, kind) == (broken, None, None, "truncated")
    where = f"while reading key {broken!r}" if read else "before its first member"
    if known:
        where = f"after key {samples[known[-1]][0]!r}, {where}"
    assert message.startswith(f"shard {str(tmp_path / f'cut{size}.tar')!r} broke {where}")


def test_garbage_and_unopenable_shards_are_one_row_for_the_shard_itself(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "png.tar").write_bytes(PNG)
    (tmp_path / "folder.tar").mkdir()
    bad_gzip = tmp_path / "bad.tar.gz"
    bad_gzip.write_bytes(b"\x1f\x8b\x08\x00" + bytes(600))
    expected = {
        garbage: "truncated", tmp_path / "png.tar": "truncated", bad_gzip: "truncated",
        tmp_path / "missing.tar": "not_found", tmp_path / "folder.tar": "unreadable",
    }
    for shard, kind in expected.items():
        (row,) = read_shard(str(shard))
        assert (row.key, row.data, row.failure.error_type) == ("", None, kind), row
        assert list(read_shard(str(shard), done={""})) == []
    (row,) = read_shard(str(garbage))
    assert row.failure.message.startswith(f"shard {str(garbage)!r} broke before its first member: ")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_shard_without_read_permission(tmp_path):
    shard = write_shard(tmp_path / "s.tar", [("a.jpg", JPG)])
    shard.chmod(0)
    assert [s.failure.error_type for s in read_shard(str(shard))] == ["permission_denied"]


@pytest.mark.parametrize("pattern, names", [
    ("s/{0..3}.tar", ["s/0.tar", "s/1.tar", "s/2.tar", "s/3.tar"]),
    ("s/{0008..0011}.tar", ["s/0008.tar", "s/0009.tar", "s/0010.tar", "s/0011.tar"]),
    ("s/{8..010}.tar", ["s/008.tar", "s/009.tar", "s/010.tar"]),  # bash: the wider bound pads
    ("s/{3..1}.tar", ["s/1.tar", "s/2.tar", "s/3.tar"]),
    ("{train,val}/{0..1}.tar", ["train/0.tar", "train/1.tar", "val/0.tar", "val/1.tar"]),
    ("s/{a,b{1..2}}.tar", ["s/a.tar", "s/b1.tar", "s/b2.tar"]),
    ("s/{x}/{0..1}.tar", ["s/{x}/0.tar", "s/{x}/1.tar"]),  # no ',' nor '..': literal
    ("s3://b/{00..01}.tar", ["s3://b/00.tar", "s3://b/01.tar"]),
])
def test_brace_patterns_spell_names_like_bash(pattern, names):
    assert _expand_braces(pattern) == names


def test_brace_patterns_name_shards_that_must_exist(tmp_path):
    for i in range(12):
        write_shard(tmp_path / "s" / f"{i:05d}.tar", [("a.jpg", JPG)])
    named = expand_shards(tmp_path / "s/{00002..00004}.tar")
    assert named == [str(tmp_path / f"s/{i:05d}.tar") for i in (2, 3, 4)]
    with pytest.raises(SourceError, match=r"8 of the 20 shards .* exist: '.*/00012.tar', .* 3 more"):
        expand_shards(str(tmp_path / "s/{00000..00019}.tar"))
    with pytest.raises(SourceError, match="opens a '{' that it never closes"):
        expand_shards(str(tmp_path / "s/{00000..00019.tar"))


def test_folders_globs_and_files_expand_to_sorted_shards(tmp_path, monkeypatch):
    for name in ["b/001.tar", "b/000.tar", "a/x/000.tar.gz", "a/000.tgz", "c/000.TAR"]:
        write_shard(tmp_path / name, [("a.jpg", JPG)])
    (tmp_path / "b" / "000.idx").write_text("not a shard")
    names = ["a/000.tgz", "a/x/000.tar.gz", "b/000.tar", "b/001.tar", "c/000.TAR"]
    everything = [str(tmp_path / n) for n in names]
    assert expand_shards(tmp_path) == everything
    assert expand_shards(str(tmp_path / "**" / "*")) == everything  # a glob: only shards match
    assert expand_shards(f"{tmp_path}/*/*.tar") == everything[2:4]
    assert expand_shards(f"{tmp_path}/{{b,a}}/*") == everything[:1] + everything[2:4]
    assert expand_shards(f"{tmp_path}/b/00?.tar") == everything[2:4]
    assert expand_shards(f"{tmp_path}/b/00[01].tar") == everything[2:4]
    monkeypatch.chdir(tmp_path)
    assert expand_shards("b/001.tar") == everything[3:4]  # relative names come back absolute
    assert expand_shards(Path("b")) == everything[2:4]
    for spec in [tmp_path / "nowhere.tar", tmp_path / "b" / "*.tgz", tmp_path / "empty"]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        message = f"no shards match {str(spec)!r}: looked for a file"
        with pytest.raises(SourceError, match=re.escape(message)):
            expand_shards(spec)


def test_shard_specs_are_told_from_image_folders_and_manifests(tmp_path):
    write_shard(tmp_path / "shards" / "train" / "000.tar", [("a.jpg", JPG)])
    (tmp_path / "shards" / "README.md").write_text("a shard folder")
    (tmp_path / "images" / "cats").mkdir(parents=True)
    (tmp_path / "images" / "cats" / "0.jpg").write_bytes(JPG)
    write_shard(tmp_path / "images" / "backup.tar", [("a.jpg", JPG)])  # images win
    (tmp_path / "m.csv").write_text("path\n")
    (tmp_path / "empty").mkdir()
    table = {
        "shards": True, "shards/train": True, "shards/train/000.tar": True, "gone/{0..9}.tar": True,
        "shards/*/*.tar.gz": True, "x.tgz": True, "images": False, "m.csv": False, "empty": False,
        "nowhere": False,
    }
    assert {k: is_shard_spec(tmp_path / k) for k in table} == table
    assert is_shard_spec((tmp_path / "shards").as_uri())
    assert not is_shard_spec((tmp_path / "images").as_uri())
    assert not is_shard_spec("nosuchscheme://bucket/images")


@pytest.mark.parametrize("shards, root, names", [
    (["/d/s/a/0.tar", "/d/s/b/1.tar.gz"], "/d/s", ["a/0", "b/1"]),
    (["/d/s/0.tgz"], "/d/s", ["0"]),
    (["s3://b/s/x/0.tar", "s3://b/s/y/1.tar"], "s3://b/s", ["x/0", "y/1"]),
    (["file:///d/a%20%231.tar", "file:///d/2.tar"], "file:///d", ["a #1", "2"]),
])
def test_shard_names_are_paths_below_the_common_root(shards, root, names):
    assert common_root(shards) == root
    assert [shard_name(s, root) for s in shards] == names


def test_uris_name_and_stream_shards_as_local_paths_do(tmp_path):
    members = [("a.jpg", JPG), ("a.cls", b"1"), ("b.png", PNG)]
    for name in ["s/000.tar", "s/001.tar", "s/odd #1 100%.tar", "s/sub/002.tar"]:
        write_shard(tmp_path / name, members)
    root = (tmp_path / "s").as_uri()
    shards = expand_shards(root)
    odd = "odd%20%231%20100%25.tar"  # quoted, as uris.join writes it
    assert shards == [f"{root}/{n}" for n in ["000.tar", "001.tar", odd, "sub/002.tar"]]
    assert expand_shards(root + "/{000..001}.tar") == shards[:2]
    assert expand_shards(root + "/{odd%20%231%20100%25,001}.tar") == shards[1:3]
    assert expand_shards(root + "/*.tar") == shards[:3]
    assert expand_shards(root + "/**/*.tar") == shards
    names = [shard_name(s, common_root(shards)) for s in shards]
    assert names == ["000", "001", "odd #1 100%", "sub/002"]
    with pytest.raises(SourceError, match=r"1 of the 3 shards .* do not exist: '.*/002.tar'"):
        expand_shards(root + "/{000..002}.tar")
    with pytest.raises(SourceError, match="cannot list"):
        expand_shards("nosuchscheme://bucket/{0..1}.tar")
    for uri in shards:  # pyarrow's input stream cannot seek: the read is one pass
        local = tmp_path / "s" / f"{shard_name(uri, root)}.tar"
        assert rows(read_shard(uri)) == rows(read_shard(str(local)))
    assert [s.failure.error_type for s in read_shard(root + "/gone.tar")] == ["not_found"]
    assert [s.failure.error_type for s in read_shard("nosuchscheme://b/0.tar")] == ["unreadable"]


def test_a_cut_compressed_shard_breaks_the_same_way(tmp_path):
    # noise does not compress: half the file is about half the samples
    samples = [(f"{i}.png", image_bytes("PNG", i, size=(64, 64))) for i in range(6)]
    whole = write_shard(tmp_path / "s.tar.gz", samples, mode="w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    got = rows(read_shard(str(cut)))
    assert 2 <= len(got) <= 5
    assert got[:-1] == [(n[:-4], n, None, b, None) for n, b in samples[: len(got) - 1]]
    assert got[-1][:4] == (str(len(got) - 1), f"{len(got) - 1}.png", None, None)
    assert got[-1][4][0] == "truncated"
