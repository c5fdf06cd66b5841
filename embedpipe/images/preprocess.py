"""Preprocessing that travels with the weights: resize, centre crop, mean and std.

The geometric part (resize the shorter side, centre crop) runs in the decode workers on
PIL images and hands uint8 pixels to the main process, which converts and normalises a
whole batch at once (on the GPU when there is one). Together they compute exactly what
torchvision's ``ImageClassification`` preset computes on a PIL image; a test holds them
to that. This module imports neither torch nor torchvision so that decode workers start
fast and small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size``, normalise.

    ``channels`` is 3 for RGB networks and 1 for grayscale ones (LeNet-5).
    """

    resize_size: int
    crop_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; choose one of {sorted(_RESAMPLE)}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} must have one value per channel "
                f"({self.channels})"
            )
        if self.resize_size < 1 or self.crop_size < 1:
            raise ValueError(f"sizes must be positive: resize {self.resize_size}, crop {self.crop_size}")

    @property
    def mode(self) -> str:
        """The PIL mode images are converted to before resizing."""
        return "RGB" if self.channels == 3 else "L"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            resize_size=int(d["resize_size"]),
            crop_size=int(d["crop_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            interpolation=str(d["interpolation"]),
            channels=int(d["channels"]),
        )

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """``img`` (already in :attr:`mode`) -> (crop, crop, channels) uint8, C-contiguous.

        Mirrors torchvision's ``F.resize`` (shorter side, long side truncated as
        ``int(size * long / short)``, no-op when the short side already matches) and
        ``F.center_crop`` (rounded offsets, zero padding when the image is smaller).
        """
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize_size:
            new_short, new_long = self.resize_size, int(self.resize_size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            img = img.resize((new_w, new_h), _RESAMPLE[self.interpolation])
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return _center_crop(arr, self.crop_size)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if size > h or size > w:  # torchvision pads with zeros, then crops
        pad_h, pad_w = max(size - h, 0), max(size - w, 0)
        top, left = pad_h // 2, pad_w // 2
        arr = np.pad(arr, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return np.ascontiguousarray(arr[top : top + size, left : left + size])
