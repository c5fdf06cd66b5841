"""JPEG decoding and resizing on the extraction device (``--decode device``).

With a GPU, nvJPEG (through ``torchvision.io.decode_jpeg(device="cuda")``) decodes a
whole batch at once and the resize runs there too, which frees the CPU cores when they,
not the GPU, limit throughput. The same code runs on the CPU (libjpeg-turbo), which is
how it is tested on machines without a GPU.

Resizing uses torch's antialiased interpolation rather than PIL's, so embeddings differ
slightly from the worker path; ``benchmarks/extract.py`` and the tests measure by how much.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ..images.decode import Decoded, DecodeFailure, EncodedJPEG, ErrorType
from ..images.preprocess import Preprocessing

# torchvision 0.29 announces that TorchCodec will take over image decoding; until it
# does, decode_jpeg is the maintained nvJPEG binding that ships with torchvision.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> upright, for an EXIF orientation tag (1-8): what Pillow's
    ``ImageOps.exif_transpose`` does, as tensor ops that run on the device.

    torchvision's CUDA JPEG decoder ignores ``apply_exif_orientation``, so the tag is read
    on the host (:class:`EncodedJPEG.orientation`) and applied here, on every device alike.
    """
    rows, cols = -2, -1
    if orientation == 2:  # mirrored left-right
        return img.flip(cols)
    if orientation == 3:  # upside down
        return img.flip(rows, cols)
    if orientation == 4:  # mirrored top-bottom
        return img.flip(rows)
    if orientation == 5:  # transposed (mirror across the main diagonal)
        return img.transpose(rows, cols)
    if orientation == 6:  # turned 90 degrees counter-clockwise: turn it clockwise
        return torch.rot90(img, k=-1, dims=(rows, cols))
    if orientation == 7:  # transversed (mirror across the anti-diagonal)
        return img.transpose(rows, cols).flip(rows, cols)
    if orientation == 8:  # turned clockwise: turn it counter-clockwise
        return torch.rot90(img, k=1, dims=(rows, cols))
    return img


def _resize_crop(img: torch.Tensor, p: Preprocessing) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, crop, crop) uint8, torchvision's tensor resize and crop."""
    img = F.resize(img, [p.resize_size], interpolation=F.InterpolationMode(p.interpolation), antialias=True)
    return F.center_crop(img, [p.crop_size])


def decode_items(
    items: list[Decoded | EncodedJPEG], preprocessing: Preprocessing, device: torch.device
) -> tuple[torch.Tensor, dict[int, DecodeFailure]]:
    """A batch of worker results -> (B', C, crop, crop) uint8 on ``device``.

    Items the device decoder rejects are left out of the tensor and returned as
    failures, keyed by their index in ``items``.
    """
    encoded = [i for i, d in enumerate(items) if isinstance(d, EncodedJPEG)]
    datas = [torch.frombuffer(bytearray(items[i].data), dtype=torch.uint8) for i in encoded]
    decoded: dict[int, torch.Tensor] = {}
    failures: dict[int, DecodeFailure] = {}
    try:
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        decoded = dict(zip(encoded, images))
    except RuntimeError:  # one bad stream fails the batch call: find it
        for i, data in zip(encoded, datas):
            try:
                decoded[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as e:
                message = str(e).rsplit(", ", 1)[-1]  # drop torchvision's source location
                kind = ErrorType.TRUNCATED if "truncated" in message else ErrorType.DECODE_ERROR
                failures[i] = DecodeFailure(kind, f"device JPEG decoder: {message}")
    out = []
    for i, d in enumerate(items):
        if i in failures:
            continue
        if isinstance(d, Decoded):
            out.append(torch.from_numpy(np.ascontiguousarray(d.pixels)).permute(2, 0, 1).to(device))
        else:
            out.append(_resize_crop(orient(decoded[i], d.orientation), preprocessing))
    if not out:
        crop = preprocessing.crop_size
        return torch.empty(0, 3, crop, crop, dtype=torch.uint8, device=device), failures
    return torch.stack(out), failures
