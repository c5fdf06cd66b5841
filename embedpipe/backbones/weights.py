"""Weights: what a ``--weights`` value names, where torchvision caches it, and reading a
checkpoint without executing pickled code.

Weights are ``none`` (seeded random init, recorded as such), ``DEFAULT`` or a torchvision
enum name (resolved through torchvision's own download and ``TORCH_HOME`` cache), or a
local checkpoint (a state_dict, loaded with ``weights_only=True`` or safetensors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum

from ..errors import WeightsError
from ..files import sha256_file, temporary_sibling
from .spec import BackboneSpec

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def resolve_weights(spec: BackboneSpec, weights: str) -> WeightsEnum | Path | str | None:
    """Interpret a ``--weights`` value: ``None`` (random), a torchvision weights enum, a
    checkpoint file, or the name of one of ``spec.pretrained``. Names are matched without
    regard to case (``default``, ``imagenet1k_v2``); a path is a path."""
    if weights.lower() == "none":
        return None
    if Path(weights).is_file():
        return Path(weights).resolve()
    if _looks_like_path(weights):
        raise WeightsError(f"checkpoint file {weights!r} does not exist")
    pretrained = {name.lower(): name for name in spec.pretrained}
    if weights.lower() in pretrained:
        return pretrained[weights.lower()]
    if spec.weights_enum is None:
        known = f"choose one of {', '.join(spec.pretrained)}, " if spec.pretrained else "it has no published weights; use "
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}: {known}--weights none or a checkpoint path"
        )
    if weights.lower() == "default":
        return spec.weights_enum.DEFAULT
    members = {member.name.lower(): member for member in spec.weights_enum}
    try:
        return members[weights.lower()]
    except KeyError:
        raise WeightsError(
            f"unknown weights {weights!r} for {spec.name}; choose one of "
            f"{', '.join(spec.weight_names())}, 'none', or a checkpoint path"
        ) from None


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision looks for ``weights`` (``$TORCH_HOME/hub/checkpoints/...``)."""
    filename = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


#: where a fine-tuning checkpoint records how its network was built (see embedpipe.finetune)
FINETUNE_KEY = "embedpipe_finetune"


def _read(path: Path) -> object:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise WeightsError(
            f"cannot read checkpoint {path}: {e}. It must be a state_dict saved with "
            "torch.save (loadable with weights_only=True) or a .safetensors file"
        ) from e


def _state_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path} does not hold a state_dict of tensors")
    return obj


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> state_dict, without executing pickled code.

    Accepts a bare state_dict, or a dict holding one under ``state_dict`` or ``model``
    (the layout fine-tuning runs and most training scripts save).
    """
    return _state_of(_read(path), path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, bool] | None]:
    """(state_dict, build flags) of a checkpoint: the flags a fine-tuning run recorded
    (``{"transform_input": False}`` for a GoogLeNet trained from random init), or ``None``
    for checkpoints that do not say (taken to descend from torchvision's ImageNet weights)."""
    obj = _read(path)
    build = None
    if isinstance(obj, dict) and isinstance(obj.get(FINETUNE_KEY), dict):
        build = obj[FINETUNE_KEY].get("build")
    return _state_of(obj, path), build


_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's convention: name-<sha256 prefix>.ext


def torchvision_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The state_dict of torchvision ``weights``, never unpickled.

    Read from torchvision's cache (``$TORCH_HOME/hub/checkpoints``), downloaded there first
    when missing (as torchvision would), checked against the sha256 prefix in its file name,
    and loaded with ``weights_only=True``, where torchvision's own loader unpickles.
    """
    path = cached_weights_path(weights)
    match = _HASH_PREFIX.search(path.name)
    prefix = match.group(1) if match else None
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(path)
        try:
            torch.hub.download_url_to_file(weights.url, str(tmp), hash_prefix=prefix, progress=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if prefix is not None and not sha256_file(path).startswith(prefix):
        raise WeightsError(
            f"the cached weights {path} are damaged or not what {weights} names: their sha256 "
            f"does not start with {prefix}, as the file name says. Delete the file and run again "
            f"(it is downloaded from {weights.url}), or place the right file there"
        )
    return load_state_dict(path)


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
