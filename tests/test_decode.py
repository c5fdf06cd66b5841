"""The bad-input corpus: every file is either decoded correctly or described by an error.

Every case is made here by the test itself; expected pixels come from independent
PIL/numpy arithmetic rather than from the decoder under test.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from embedpipe.config import DecodeMode
from embedpipe.images.decode import Decoded, DecodeFailure, EncodedJPEG, decode_file
from embedpipe.images.preprocess import Preprocessing

P = Preprocessing(resize_size=8, crop_size=8)
RAW = Preprocessing(resize_size=4, crop_size=4)  # the corpus images are 4 px on a side


def decode(path: Path, p: Preprocessing = RAW, max_pixels: int = 10**8, mode=DecodeMode.FULL):
    return decode_file(str(path), p, max_pixels=max_pixels, mode=mode)


def failure(path: Path, **kw) -> str:
    d = decode(path, **kw)
    assert isinstance(d, DecodeFailure), d
    return d.error_type.value


def pixels(path: Path, p: Preprocessing = RAW) -> np.ndarray:
    d = decode(path, p)
    assert isinstance(d, Decoded), d
    return d.pixels


def solid(mode: str, colour, size=(4, 4)) -> Image.Image:
    return Image.new(mode, size, colour)


# --- files that cannot be embedded -------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    assert failure(tmp_path / "a.jpg") == "empty_file"


def test_truncated_jpeg(tmp_path):
    path = make_image(tmp_path / "t.jpg", size=(256, 256), quality=95)
    path.write_bytes(path.read_bytes()[:2000])
    assert failure(path, p=P) == "truncated"


def test_random_bytes_named_jpg(tmp_path):
    (tmp_path / "r.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    assert failure(tmp_path / "r.jpg") == "not_an_image"


def test_format_off_the_allow_list(tmp_path):
    solid("RGB", (1, 2, 3)).save(tmp_path / "x.jpg", format="PPM")  # Pillow reads it; we refuse
    assert failure(tmp_path / "x.jpg") == "not_an_image"


def test_decompression_bomb_refused_before_decoding(tmp_path):
    # a valid PNG claiming 20000x20000 pixels with a few bytes of pixel data: decoding
    # it would allocate 1.2 GB before noticing
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    assert failure(tmp_path / "bomb.png", max_pixels=10**8) == "too_many_pixels"
    small = make_image(tmp_path / "s.png", size=(100, 100))
    assert failure(small, max_pixels=9_999) == "too_many_pixels"  # the limit is configurable
    assert isinstance(decode(small, max_pixels=10_000), Decoded)


def test_unreadable_file(tmp_path, monkeypatch):
    path = make_image(tmp_path / "p.png")
    if os.geteuid() != 0:  # root reads anything: there, simulate what open() raises
        path.chmod(0)
        assert failure(path) == "permission_denied"
        return
    real_open = open

    def denied(file, *a, **k):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", denied)
    assert failure(path) == "permission_denied"


def test_broken_symlink_and_symlink_loop(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    assert failure(tmp_path / "broken.jpg") == "not_found"
    assert failure(tmp_path / "loop.jpg") == "unreadable"


def test_directory_given_as_a_file(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    assert failure(tmp_path / "d.jpg") == "unreadable"


# --- files that decode, with the right conversion ------------------------------------


def test_png_named_jpg_decodes_by_content(tmp_path):
    solid("RGB", (10, 200, 30)).save(tmp_path / "x.jpg", format="PNG")
    assert (pixels(tmp_path / "x.jpg") == [10, 200, 30]).all()


def test_cmyk_jpeg(tmp_path):
    solid("CMYK", (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)  # pure red in CMYK
    px = pixels(tmp_path / "c.jpg").astype(int)
    assert abs(px[..., 0] - 255).max() <= 3 and px[..., 1:].max() <= 3


def test_16_bit_png_keeps_its_high_byte(tmp_path):
    arr = np.full((4, 4), 0x8040, np.uint16)  # 32832 -> 128 after >> 8, not clipped to 255
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert (pixels(tmp_path / "g16.png") == 0x80).all()


def test_grayscale_and_one_bit(tmp_path):
    solid("L", 77).save(tmp_path / "l.png")
    solid("1", 1).save(tmp_path / "b.png")
    assert (pixels(tmp_path / "l.png") == 77).all()
    assert (pixels(tmp_path / "b.png") == 255).all()


def test_rgba_and_palette_transparency_are_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    Image.new("RGBA", (4, 4), (0, 0, 255, 128)).save(tmp_path / "half.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    assert (pixels(tmp_path / "clear.png") == 255).all()
    half = pixels(tmp_path / "half.png").astype(int)
    expected = np.array([255 - 128, 255 - 128, 255])  # 50% blue over white, within rounding
    assert np.abs(half - expected).max() <= 1
    assert (pixels(tmp_path / "pal.png") == 255).all()


def test_animated_gif_first_frame(tmp_path):
    frames = [solid("RGB", (255, 0, 0)), solid("RGB", (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "a.gif").n_frames == 2
    px = pixels(tmp_path / "a.gif").astype(int)
    assert px[..., 0].min() > 240 and px[..., 2].max() < 15


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white, stored landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    d = decode(tmp_path / "rot.jpg", Preprocessing(resize_size=4, crop_size=4))
    assert (d.width, d.height) == (4, 8)  # portrait once oriented
    upright = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270).resize((4, 8)))
    top = d.pixels[0].astype(int).mean()
    assert top > 200 and upright[0].mean() > 200  # the white half is now on top


def test_one_pixel_image(tmp_path):
    solid("RGB", (9, 8, 7), size=(1, 1)).save(tmp_path / "one.png")
    px = pixels(tmp_path / "one.png", P)
    assert px.shape == (8, 8, 3) and (px == [9, 8, 7]).all()


def test_non_ascii_and_spaces_in_the_name(tmp_path):
    path = make_image(tmp_path / "caffè latte ☕.png")
    assert isinstance(decode(path, P), Decoded)


def test_content_hash_and_original_size(tmp_path):
    path = make_image(tmp_path / "x.jpg", size=(1200, 900), quality=90)
    import hashlib

    d = decode(path, P, mode=DecodeMode.DRAFT)
    assert (d.width, d.height) == (1200, 900)  # the file's size, not the draft's
    assert d.content_hash == hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def test_draft_only_changes_large_jpegs(tmp_path):
    small = make_image(tmp_path / "small.jpg", size=(20, 14), quality=90)
    assert np.array_equal(decode(small, P, mode=DecodeMode.DRAFT).pixels, pixels(small, P))
    big = make_image(tmp_path / "big.jpg", size=(800, 560), quality=90)
    assert not np.array_equal(decode(big, P, mode=DecodeMode.DRAFT).pixels, pixels(big, P))



# --- the device path (--decode device), forced on the CPU ------------------------------


def _asymmetric_jpeg(path: Path, orientation: int) -> Path:
    """A 96x64 JPEG whose every flip and turn looks different, with an EXIF orientation."""
    yy, xx = np.mgrid[0:64, 0:96]
    arr = np.stack([xx * 255 // 95, yy * 255 // 63, ((xx < 30) & (yy < 20)) * 255], -1).astype(np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


def _device_pixels(path: Path, p: Preprocessing) -> np.ndarray:
    """The pixels the GPU path computes: the worker only checks the file, then
    ``decode_items`` decodes, orients and resizes it on the device (the CPU here)."""
    import torch

    from embedpipe.extraction.device_decode import decode_items

    item = decode(path, p, mode=DecodeMode.DEVICE)
    assert isinstance(item, EncodedJPEG)
    x, failures = decode_items([item], p, torch.device("cpu"))
    assert not failures
    return x[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_applies_exif_orientation(tmp_path, orientation):
    p = Preprocessing(resize_size=48, crop_size=48)
    path = _asymmetric_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    worker = decode(path, p, mode=DecodeMode.FULL)
    device = decode(path, p, mode=DecodeMode.DEVICE)
    assert (device.width, device.height) == (worker.width, worker.height)
    assert device.orientation == orientation
    got = _device_pixels(path, p).astype(int)
    # the two resizers (PIL's and torch's antialiased one) differ by a level or two...
    assert np.abs(got - worker.pixels.astype(int)).mean() < 3
    # ... while the image as stored (no orientation applied) is far from it
    if orientation != 1:
        stored = decode(_asymmetric_jpeg(tmp_path / "stored.jpg", 1), p, mode=DecodeMode.FULL)
        assert np.abs(stored.pixels.astype(int) - worker.pixels.astype(int)).mean() > 20


def test_device_decode_pixels_match_the_worker_path_on_photos(tmp_path):
    """Pixels, not embeddings of a random network: the device resize must stay within a
    couple of levels of the exact path, far closer than two different photos are."""
    from embedpipe.images.samples import photo_folder

    p = Preprocessing(resize_size=256, crop_size=224)
    photos = sorted(photo_folder(tmp_path / "photos").glob("*.jpg"))[:4]
    exact = [decode(f, p, mode=DecodeMode.FULL).pixels.astype(int) for f in photos]
    device = [_device_pixels(f, p).astype(int) for f in photos]
    same = [np.abs(a - b).mean() for a, b in zip(device, exact)]
    different = [np.abs(a - b).mean() for a, b in zip(exact, exact[1:])]
    assert max(same) < 2.5 and min(different) > 10 * max(same)


def test_draft_decoding_stays_close_to_full_decoding_on_photos(tmp_path):
    """Draft (DCT-domain downscaling) changes pixels of large JPEGs by a few levels, far
    less than two different photos differ; it is never the default."""
    from embedpipe.images.samples import photo_folder

    p = Preprocessing(resize_size=256, crop_size=224)
    big = []
    for f in sorted(photo_folder(tmp_path / "photos").glob("*.jpg"))[:4]:
        img = Image.open(f).convert("RGB")
        big.append(tmp_path / f"big-{f.name}")
        img.resize((img.width * 3, img.height * 3), Image.Resampling.BICUBIC).save(big[-1], quality=92)
    full = [decode(f, p, mode=DecodeMode.FULL).pixels.astype(int) for f in big]
    draft = [decode(f, p, mode=DecodeMode.DRAFT).pixels.astype(int) for f in big]
    same = [np.abs(a - b).mean() for a, b in zip(draft, full)]
    different = [np.abs(a - b).mean() for a, b in zip(full, full[1:])]
    # measured: 0.6 to 7 levels on a detailed photo, against 67 to 83 between photos
    assert 0 < min(same) and max(same) < 10 and min(different) > 5 * max(same)
