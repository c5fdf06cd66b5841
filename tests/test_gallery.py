"""Neighbour galleries: a neighbour of another label than its query is marked."""

from __future__ import annotations

import io

import numpy as np
from conftest import make_image
from PIL import Image

from embedpipe.gallery import MISMATCH_COLOUR, Gallery, gallery_page, render_gallery
from embedpipe.provenance import Provenance


def _red_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    target = np.array([int(MISMATCH_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=2) < 12).sum())


def test_neighbours_of_another_label_are_framed(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", size=(60, 40), seed=i) for i in range(4)]
    neighbours = [(p, f"cats/{p.name}", 0.9 - i / 10) for i, p in enumerate(paths[1:])]
    same = render_gallery(paths[0], neighbours, title="t", query_label="cats", labels=["cats"] * 3)
    one_off = render_gallery(paths[0], neighbours, title="t", query_label="cats",
                             labels=["cats", "dogs", "cats"])
    unlabelled = render_gallery(paths[0], neighbours, title="t", labels=["cats", "dogs", "cats"])
    assert _red_pixels(same) == _red_pixels(unlabelled)  # nothing marked (the photos' own red)
    # a 3 px frame around one 144 px thumbnail, and its caption
    assert _red_pixels(one_off) - _red_pixels(same) > 4 * 144


def test_the_page_scales_to_the_window_and_names_each_query():
    page = gallery_page(
        [Gallery("cats/000.jpg", b"png"), Gallery("dogs/001.jpg", b"png")],
        provenance=Provenance.from_json({"backbone": "resnet18", "layer": "gap"}),
    )
    assert "max-width: 100%" in page and "max-width: 1200px" in page
    assert page.count("<figcaption>") == 2 and "dogs/001.jpg</figcaption>" in page
