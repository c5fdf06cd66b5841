"""Decode workers: order kept, a dying or hanging decoder costs one image."""

from __future__ import annotations

import shutil
import time

import numpy as np
from conftest import make_image
from crashy import crashy_decode_chunk

from embedpipe.config import DecodeMode
from embedpipe.images.decode import Decoded, DecodeFailure, decode_file
from embedpipe.images.loader import DecodePool
from embedpipe.images.preprocess import Preprocessing
from embedpipe.images.sources import scan_folder

P = Preprocessing(resize_size=16, crop_size=16)


def test_results_come_back_in_order(image_folder):
    records = scan_folder(image_folder)
    with DecodePool(P, workers=2, max_pixels=10**8, chunk_size=3, prefetch=6) as pool:
        out = list(pool.imap(records))
    assert [r.id for r, _ in out] == [r.id for r in records]
    assert all(isinstance(d, Decoded) and d.pixels.shape == (16, 16, 3) for _, d in out)


def test_a_crashing_or_hanging_decoder_costs_one_image(tmp_path):
    root = tmp_path / "imgs"
    for i in range(12):
        make_image(root / f"{i:02d}.png", seed=i)
    shutil.copy(root / "03.png", root / "03_crash.png")
    shutil.copy(root / "07.png", root / "07_hang.png")
    records = scan_folder(root)
    with DecodePool(P, workers=2, max_pixels=10**8, chunk_size=4, timeout=2.0,
                    decode_fn=crashy_decode_chunk) as pool:
        out = dict((r.id, d) for r, d in pool.imap(records))
    assert len(out) == 14
    assert out["03_crash.png"].error_type == "decoder_crash" and "139" in out["03_crash.png"].message
    assert out["07_hang.png"].error_type == "timeout"
    good = {k: v for k, v in out.items() if "_" not in k}
    assert len(good) == 12 and all(isinstance(v, Decoded) for v in good.values())
    for name, d in good.items():  # the chunk-mates of the culprits, decoded again, are right
        reference = decode_file(str(root / name), P, max_pixels=10**8, mode=DecodeMode.FULL)
        np.testing.assert_array_equal(d.pixels, reference.pixels)


def test_a_hung_image_costs_one_timeout_not_a_chunks_worth(tmp_path):
    """Old behaviour: a chunk of 8 waited 8 x timeout, then its culprit another timeout
    (13.5 s here); now the culprit is known from the worker's progress after one."""
    root = tmp_path / "imgs"
    for i in range(8):
        make_image(root / f"{i:02d}.png", seed=i)
    shutil.copy(root / "02.png", root / "02_hang.png")
    records = scan_folder(root)
    started = time.monotonic()
    with DecodePool(P, workers=1, max_pixels=10**8, chunk_size=8, timeout=1.5,
                    decode_fn=crashy_decode_chunk) as pool:
        out = dict((r.id, d) for r, d in pool.imap(records))
    elapsed = time.monotonic() - started
    assert out["02_hang.png"].error_type == "timeout"
    assert sum(isinstance(d, Decoded) for d in out.values()) == 8
    assert elapsed < 7, f"{elapsed:.1f} s for one hung image with a 1.5 s timeout"


def test_failures_are_records_not_exceptions(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    with DecodePool(P, workers=1, max_pixels=10**8) as pool:
        ((_, d),) = list(pool.imap(scan_folder(tmp_path)))
    assert isinstance(d, DecodeFailure) and d.error_type == "empty_file"
