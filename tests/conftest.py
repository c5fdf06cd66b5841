"""Fixtures: image folders made by the tests themselves (and photos a package ships)."""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests run on 2 cores beside decode workers: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def require(module: str, why: str):
    """Import ``module`` for a test, or skip it here; under CI=true a missing tool fails."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed ({why}): pip install -e '.[test]'")
        pytest.skip(f"{module} is not installed ({why})", allow_module_level=True)


def tiny_dataset(out: Path, vectors: np.ndarray, *, labels=None, meta: dict | None = None) -> Path:
    """An embeddings dataset at ``out`` written through the store: rows ``00.png``..., the
    given (n, d) vectors, and a minimal provenance (LeNet-5's gap layer by default)."""
    from embedpipe.store import DatasetWriter, embeddings_schema, embeddings_table

    n, d = vectors.shape
    meta = meta or {"backbone": "lenet5", "dim": d, "layer": "gap"}
    with DatasetWriter(out, meta) as w:
        w.append(embeddings_table(
            ids=[f"{i:02d}.png" for i in range(n)], labels=list(labels) if labels is not None else ["x"] * n,
            vectors=np.asarray(vectors, np.float32), width=[1] * n, height=[1] * n, size=[1] * n,
            mtime_ns=[1] * n, content_hash=["h"] * n, schema=embeddings_schema(d)))
    return out


def make_image(path: Path, *, size=(64, 48), seed=0, mode="RGB", fmt=None, **save) -> Path:
    """A smooth random image (gradients plus blobs), saved by extension or ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(xx * rng.uniform(2, 9) + yy * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    arr = ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 5 JPEGs/PNGs each, in ImageFolder layout, of mixed sizes."""
    root = tmp_path / "images"
    sizes = [(64, 48), (40, 80), (96, 96), (300, 200), (33, 57)]
    for c, cls in enumerate(["cats", "dogs"]):
        for i, size in enumerate(sizes):
            ext = "jpg" if i % 2 == 0 else "png"
            make_image(root / cls / f"{i:03d}.{ext}", size=size, seed=10 * c + i)
    return root


def chromium_path() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed: `make browser` (Debian's chromium package)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; a missing browser there is a broken setup
        pytest.skip(message)
    return path


@contextlib.contextmanager
def browser_page(url: str):
    """Debian's Chromium through Playwright, on ``url``: ``(page, errors)``, the page's
    errors and console errors (a CSP refusal included) collected as they come."""
    sync_api = require("playwright.sync_api", "the browser test")
    chromium = chromium_path()
    # these machines have no network: keep Chromium from trying (see the env notes)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(url)
            yield page, errors
        finally:
            browser.close()
