"""Thumbnails: the small previews galleries, reports and the search service show.

One function for all of them, so a preview looks the same everywhere: decoded with the
extraction decoder's checks (format by content, pixel limit), upright (EXIF orientation
applied), RGB, no larger than ``size`` on its long side. JPEGs are scaled while decoding.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DEFAULT_MAX_PIXELS
from ..errors import ImageDecodeError
from .decode import ErrorType, load_image

#: what a thumbnail can be made of: a file, a PIL image, or (h, w[, 1 | 3]) uint8 pixels
ImageLike = np.ndarray | Image.Image | str | os.PathLike


def thumbnail(src: ImageLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any :data:`ImageLike` -> an RGB image no larger than ``size``; a file that cannot
    be read or decoded raises :class:`ImageDecodeError`."""
    if isinstance(src, (str, os.PathLike)):
        try:
            data = Path(src).read_bytes()
        except OSError as e:
            kind = {FileNotFoundError: ErrorType.NOT_FOUND, PermissionError: ErrorType.PERMISSION_DENIED}
            raise ImageDecodeError(
                kind.get(type(e), ErrorType.UNREADABLE), f"{src}: {e.strerror or e}"
            ) from None
        img, _ = load_image(data, mode="RGB", max_pixels=max_pixels, draft_size=size)
    elif isinstance(src, Image.Image):
        img = src.convert("RGB")
    else:
        arr = np.asarray(src)
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 pixels, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        img = Image.fromarray(arr).convert("RGB")
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.BICUBIC)
    return img


def thumbnail_jpeg(src: ImageLike, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """:func:`thumbnail` encoded as a JPEG (quality 85)."""
    buf = io.BytesIO()
    thumbnail(src, size, max_pixels=max_pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()
