"""The backbone registry: one place maps a name to its builder, weights and preprocessing.

torchvision's families register here at import; ``timm/<model>`` and
``package.module:callable`` names register on first use, installed plugins (the entry-point
group ``embedpipe.backbones``) on the first miss. A name registered twice is an error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import get_model_builder, get_model_weights

from ..config import Layer
from ..errors import DuplicateBackboneError, UnknownBackboneError, WeightsError, did_you_mean
from ..images.preprocess import Preprocessing
from .lenet import lenet5
from .spec import BackboneSpec, CustomBackbone

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` to the registry; a name registered twice is an error."""
    if spec.name in _REGISTRY:
        raise DuplicateBackboneError(f"a backbone named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    """The spec registered as ``name``; ``timm/<model>`` and ``package.module:callable``
    are resolved (and registered) on first use, entry points on first miss."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        from .timm import timm_spec

        return register(timm_spec(name.removeprefix("timm/")))
    if ":" in name:
        return register(user_spec(name))
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{did_you_mean(name, _REGISTRY)} Run `embedpipe backbones` to list all "
            f"{len(_REGISTRY)} registered backbones."
        ) from None


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, entry-point plugins included (timm's are listed by
    ``embedpipe.backbones.timm.list_timm``)."""
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


# --- user backbones ------------------------------------------------------------------
ENTRY_POINT_GROUP = "embedpipe.backbones"

def _custom_spec(name: str, factory: Callable[[], CustomBackbone]) -> BackboneSpec:
    probe = factory()
    if not isinstance(probe, CustomBackbone):
        raise WeightsError(f"backbone {name!r} must return embedpipe.backbones.CustomBackbone, got {type(probe).__name__}")
    p = probe.preprocessing
    with torch.inference_mode():
        out = probe.model.eval()(torch.zeros(2, p.channels, p.crop_size, p.crop_size))
    if tuple(out.shape) != (2, probe.dim):
        raise WeightsError(
            f"backbone {name!r} declares dim {probe.dim} but maps a (2, {p.channels}, "
            f"{p.crop_size}, {p.crop_size}) batch to {tuple(out.shape)}"
        )

    def builder(weights: None = None) -> nn.Module:
        return factory().model

    return BackboneSpec(
        name=name, family="custom", builder=builder, dims={Layer.GAP: probe.dim},
        default_preprocessing=p, source="user", cut={Layer.GAP: ()},
    )


def user_spec(reference: str) -> BackboneSpec:
    """``package.module:callable`` -> a spec; the callable returns a :class:`CustomBackbone`."""
    module, _, attr = reference.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownBackboneError(
            f"cannot import backbone {reference!r} ({e}); a user backbone is "
            "'package.module:callable' importable from this Python"
        ) from e
    return _custom_spec(reference, factory)


_ENTRY_POINTS_LOADED = False


def _load_entry_points() -> None:
    """Register backbones that installed packages declare in the entry-point group
    ``embedpipe.backbones``: name -> a callable returning a CustomBackbone, or a
    BackboneSpec (embedpipe's own efficientnet_lite0 arrives this way)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        register(obj if isinstance(obj, BackboneSpec) else _custom_spec(ep.name, obj))


def _register_torchvision(family: str, dims: dict[str, tuple[int, int]]) -> None:
    for name, (gap, penultimate) in dims.items():
        register(
            BackboneSpec(
                name=name,
                family=family,
                builder=get_model_builder(name),
                dims={Layer.GAP: gap, Layer.PENULTIMATE: penultimate},
                weights_enum=get_model_weights(name),
            )
        )


# name -> (gap dim, penultimate dim)
_register_torchvision("alexnet", {"alexnet": (256, 4096)})
_register_torchvision(
    "vgg", {f"vgg{d}{bn}": (512, 4096) for d in (11, 13, 16, 19) for bn in ("", "_bn")}
)
_register_torchvision("googlenet", {"googlenet": (1024, 1024)})
_register_torchvision("inception", {"inception_v3": (2048, 2048)})
_register_torchvision(
    "resnet",
    {
        "resnet18": (512, 512),
        "resnet34": (512, 512),
        "resnet50": (2048, 2048),
        "resnet101": (2048, 2048),
        "resnet152": (2048, 2048),
        "resnext50_32x4d": (2048, 2048),
        "wide_resnet50_2": (2048, 2048),
    },
)
_register_torchvision(
    "densenet",
    {
        "densenet121": (1024, 1024),
        "densenet161": (2208, 2208),
        "densenet169": (1664, 1664),
        "densenet201": (1920, 1920),
    },
)
_register_torchvision("mobilenet_v2", {"mobilenet_v2": (1280, 1280)})
_register_torchvision(
    "mobilenet_v3", {"mobilenet_v3_small": (576, 1024), "mobilenet_v3_large": (960, 1280)}
)
_register_torchvision(
    "efficientnet",
    {
        **{
            f"efficientnet_b{i}": (d, d)
            for i, d in enumerate((1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560))
        },
        "efficientnet_v2_s": (1280, 1280),
        "efficientnet_v2_m": (1280, 1280),
        "efficientnet_v2_l": (1280, 1280),
    },
)
_register_torchvision(
    "convnext",
    {
        "convnext_tiny": (768, 768),
        "convnext_small": (768, 768),
        "convnext_base": (1024, 1024),
        "convnext_large": (1536, 1536),
    },
)
_register_torchvision(
    "regnet",
    {
        "regnet_y_400mf": (440, 440),
        "regnet_y_800mf": (784, 784),
        "regnet_y_1_6gf": (888, 888),
        "regnet_y_3_2gf": (1512, 1512),
        "regnet_y_8gf": (2016, 2016),
        "regnet_y_16gf": (3024, 3024),
        "regnet_y_32gf": (3712, 3712),
    },
)
_register_torchvision("shufflenet", {"shufflenet_v2_x1_0": (1024, 1024)})
register(
    BackboneSpec(
        name="lenet5",
        family="lenet",
        builder=lenet5,
        dims={Layer.GAP: 120, Layer.PENULTIMATE: 84},
        # 32x32 grayscale, normalised with the MNIST statistics LeNet-5 is trained on
        default_preprocessing=Preprocessing(
            resize_size=32, crop_size=32, mean=(0.1307,), std=(0.3081,), channels=1
        ),
        source="embedpipe",
    )
)
