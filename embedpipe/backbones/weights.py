"""Weights: what a ``--weights`` value names, where torchvision caches it, and reading a
checkpoint without executing pickled code.

Weights are ``none`` (seeded random init, recorded as such), ``DEFAULT`` or a torchvision
enum name (resolved through torchvision's own download and ``TORCH_HOME`` cache), or a
local checkpoint (a state_dict, loaded with ``weights_only=True`` or safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum

from ..errors import WeightsError
from .spec import BackboneSpec

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def resolve_weights(spec: BackboneSpec, weights: str) -> WeightsEnum | Path | str | None:
    """Interpret a ``--weights`` value: ``None`` (random), a torchvision weights enum, a
    checkpoint file, or the name of one of ``spec.pretrained``."""
    if weights.lower() == "none":
        return None
    if Path(weights).is_file():
        return Path(weights).resolve()
    if _looks_like_path(weights):
        raise WeightsError(f"checkpoint file {weights!r} does not exist")
    if weights in spec.pretrained:
        return weights
    if spec.weights_enum is None:
        known = f"choose one of {', '.join(spec.pretrained)}, " if spec.pretrained else "it has no published weights; use "
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}: {known}--weights none or a checkpoint path"
        )
    try:
        return spec.weights_enum.DEFAULT if weights == "DEFAULT" else spec.weights_enum[weights]
    except KeyError:
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}; choose one of "
            f"{', '.join(spec.weight_names())}, 'none', or a checkpoint path"
        ) from None


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision looks for ``weights`` (``$TORCH_HOME/hub/checkpoints/...``)."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> state_dict, without executing pickled code.

    Accepts a bare state_dict, or a dict holding one under ``state_dict`` or ``model``
    (the layout fine-tuning runs and most training scripts save).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise WeightsError(
            f"cannot read checkpoint {path}: {e}. It must be a state_dict saved with "
            "torch.save (loadable with weights_only=True) or a .safetensors file"
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state_dict of tensors")
    return obj


def load_into(
    model: nn.Module, state: dict[str, torch.Tensor], removed: set[str], *, what: str, spec: BackboneSpec
) -> None:
    """Load ``state`` strictly into a cut model: keys of the removed head are ignored,
    every other missing or unexpected key is an error that lists them."""
    result = model.load_state_dict(
        {k: v for k, v in state.items() if k not in removed}, strict=False
    )
    unexpected = [k for k in result.unexpected_keys if k not in removed]
    if result.missing_keys or unexpected:
        raise WeightsError(
            f"{what} does not fit {spec.name}: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}. Was it saved from another "
            "architecture, or with other names? --weights-key-map renames keys "
            "(e.g. 'strip-module' for DataParallel's 'module.' prefix)."
        )
