"""Worker-side resize/crop + batch normalisation == torchvision's ImageClassification."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import get_model_weights

from embedpipe.backbones import get_spec
from embedpipe.extraction.forward import pixels_to_tensor
from embedpipe.images.preprocess import Preprocessing


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("name", ["resnet50", "inception_v3", "efficientnet_b3", "convnext_tiny"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (232, 232), (100, 60), (1, 1), (257, 256)])
def test_matches_torchvision_preset(name, size):
    """Bilinear and bicubic presets, portrait/landscape, exact-size and tiny (padded) images."""
    weights = get_model_weights(name).DEFAULT
    p = get_spec(name).preprocessing(weights)
    img = _photo(*size)
    expected = weights.transforms()(img)
    got = pixels_to_tensor(p.resize_crop(img)[None], p)[0]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_grayscale_preprocessing_has_one_channel():
    p = get_spec("lenet5").preprocessing()
    pixels = p.resize_crop(_photo(28, 28).convert(p.mode))
    assert pixels.shape == (32, 32, 1) and pixels.dtype == np.uint8


def test_round_trips_through_a_dict():
    p = Preprocessing(resize_size=256, crop_size=224, interpolation="bicubic")
    assert Preprocessing.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"interpolation": "cubic"}, "unknown interpolation"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"mean": (0.5,)}, "one value per channel"),
    ],
)
def test_invalid_preprocessing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocessing(resize_size=8, crop_size=8, **kwargs)
