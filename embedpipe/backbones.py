"""The backbone registry: one place maps a name to its builder, weights and preprocessing.

A backbone is a frozen CNN cut at a named layer:

* ``gap`` — the global average pool of the last convolutional feature map, exactly as
  the torchvision model computes it on the way to its classifier (DenseNet's final ReLU
  included, Inception's ``transform_input`` included, auxiliary heads off).
* ``penultimate`` — the input of the final classifier layer (AlexNet/VGG fc7, LeNet-5's
  F6, MobileNetV3's 1280-d hidden layer, ConvNeXt's normalised pool).

The cut is made by replacing the modules after it with ``Identity`` (or a pool), so the
classifier head is never computed and every remaining parameter keeps torchvision's
name: checkpoints load into the cut model with the same keys.

Weights are ``none`` (seeded random init, recorded as such), ``DEFAULT`` or a torchvision
enum name (resolved through torchvision's own download and ``TORCH_HOME`` cache), or a
local checkpoint (a state_dict, loaded with ``weights_only=True`` or safetensors).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_builder, get_model_weights

from .config import Layer
from .keymaps import parse_key_map
from .errors import (
    DuplicateBackboneError,
    UnknownBackboneError,
    WeightsError,
    WeightsNotFoundError,
)
from .lenet import lenet5
from .preprocess import Preprocessing

# --- the cut: which modules to replace for each family and layer ---------------------

#: (dotted attribute path, factory of the replacement module) pairs, or a function that
#: cuts a model in place (timm's ``reset_classifier(0)``, say)
Surgery = tuple[tuple[str, Callable[[], nn.Module]], ...] | Callable[[nn.Module], None]

_FC: Surgery = (("fc", nn.Identity),)
_CLASSIFIER: Surgery = (("classifier", nn.Identity),)

#: family -> layer -> surgery
_CUTS: dict[str, dict[Layer, Surgery]] = {
    # features -> avgpool(6x6 / 7x7) -> flatten -> classifier(..., fc7, ReLU, [Dropout,] fc8)
    "alexnet": {
        Layer.GAP: (("avgpool", lambda: nn.AdaptiveAvgPool2d(1)), ("classifier", nn.Identity)),
        Layer.PENULTIMATE: (("classifier.6", nn.Identity),),
    },
    "vgg": {
        Layer.GAP: (("avgpool", lambda: nn.AdaptiveAvgPool2d(1)), ("classifier", nn.Identity)),
        Layer.PENULTIMATE: (("classifier.6", nn.Identity),),
    },
    "resnet": {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
    "regnet": {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
    "shufflenet": {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
    "googlenet": {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
    "inception": {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
    # DenseNet's forward applies the final ReLU before its pool; cutting at the
    # classifier keeps it.
    "densenet": {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
    "mobilenet_v2": {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
    "efficientnet": {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
    # classifier = Linear(C, hidden), Hardswish, Dropout, Linear(hidden, 1000)
    "mobilenet_v3": {
        Layer.GAP: _CLASSIFIER,
        Layer.PENULTIMATE: (("classifier.3", nn.Identity),),
    },
    # classifier = LayerNorm2d, Flatten, Linear: gap is the raw pool, penultimate normed
    "convnext": {
        Layer.GAP: (("classifier", lambda: nn.Flatten(1)),),
        Layer.PENULTIMATE: (("classifier.2", nn.Identity),),
    },
    "lenet": {
        Layer.GAP: _CLASSIFIER,
        Layer.PENULTIMATE: (("classifier.2", nn.Identity),),
    },
}

#: Auxiliary classifiers that only run in training; dropped from every cut model.
_AUX = {"googlenet": ("aux1", "aux2"), "inception": ("AuxLogits",)}


# --- registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    ``dims`` maps each supported layer to its embedding size; a registry-wide test runs
    every backbone to hold these to the real output shape. ``weights_enum`` is the
    torchvision weights enum, or ``None`` for architectures without published weights.
    """

    name: str
    family: str
    builder: Callable[..., nn.Module]
    dims: Mapping[Layer, int]
    weights_enum: type[WeightsEnum] | None = None
    default_preprocessing: Preprocessing | None = None
    source: str = "torchvision"
    cut: Mapping[Layer, Surgery] | None = None
    pretrained: Mapping[str, Callable[[], tuple[nn.Module, WeightsInfo]]] = field(default_factory=dict)
    #: names in ``pretrained`` that are on this machine already (no download needed)
    pretrained_offline: Callable[[], list[str]] = list

    def __post_init__(self) -> None:
        if self.cut is None:
            if self.family not in _CUTS:
                raise ValueError(f"unknown family {self.family!r}; known: {sorted(_CUTS)}")
            object.__setattr__(self, "cut", _CUTS[self.family])
        if set(self.dims) != set(self.cut):
            raise ValueError(f"{self.name}: dims {list(self.dims)} and cuts {list(self.cut)} differ")
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))

    @property
    def input_size(self) -> int:
        return self.preprocessing().crop_size

    def weight_names(self) -> list[str]:
        """Names accepted by ``--weights`` besides ``none`` and a checkpoint path."""
        if self.weights_enum is None:
            return list(self.pretrained)
        return ["DEFAULT", *(w.name for w in self.weights_enum)]

    def preprocessing(self, weights: WeightsEnum | None = None) -> Preprocessing:
        """The preprocessing published with ``weights`` (default: the DEFAULT weights')."""
        if weights is None and self.default_preprocessing is not None:
            return self.default_preprocessing
        if weights is None:
            weights = self.weights_enum.DEFAULT  # type: ignore[union-attr]
        t = weights.transforms()
        return Preprocessing(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=t.interpolation.value,
        )


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
        from .timm_backbones import timm_spec

        return register(timm_spec(name.removeprefix("timm/")))
    if ":" in name:
        return register(user_spec(name))
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} Run `embedpipe backbones` to list all "
            f"{len(_REGISTRY)} registered backbones."
        ) from None


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, entry-point plugins included (timm's are listed by
    ``timm_backbones.list_timm``)."""
    _load_entry_points()
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


# --- user backbones ------------------------------------------------------------------

ENTRY_POINT_GROUP = "embedpipe.backbones"


@dataclass(frozen=True)
class CustomBackbone:
    """What a user's backbone callable returns (see docs/backbones.md).

    ``model``: (B, C, H, W) normalised float -> (B, ``dim``) embeddings, in eval mode;
    ``preprocessing``: how images are prepared for it.
    """

    model: nn.Module
    dim: int
    preprocessing: Preprocessing


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


# --- weights -------------------------------------------------------------------------


class WeightsKind(str, enum.Enum):
    NONE = "none"
    TORCHVISION = "torchvision"
    CHECKPOINT = "checkpoint"
    TIMM = "timm"  # timm's pretrained weights, through its hub cache
    PACKAGE = "package"  # a file shipped inside an installed Python package


@dataclass(frozen=True)
class WeightsInfo:
    """Provenance of a model's parameters, written into every output's metadata.

    ``name`` is ``"none"``, the torchvision enum (``"ResNet50_Weights.IMAGENET1K_V2"``)
    or the checkpoint's absolute path. ``pretrained`` is false only for random init.
    """

    kind: WeightsKind
    name: str
    pretrained: bool
    sha256: str | None = None
    url: str | None = None
    seed: int | None = None
    key_map: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        if d["key_map"] is None:  # written only when used, so older metadata still matches
            del d["key_map"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WeightsInfo:
        return cls(**{**d, "kind": WeightsKind(d["kind"])})

    def argument(self) -> str:
        """The ``--weights`` value that loads these weights again."""
        if self.kind == WeightsKind.TORCHVISION:
            return self.name.rpartition(".")[2]  # ResNet50_Weights.IMAGENET1K_V2 -> IMAGENET1K_V2
        if self.kind in (WeightsKind.TIMM, WeightsKind.PACKAGE):
            return "DEFAULT"
        return self.name  # "none", or the checkpoint's path


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _build(spec: BackboneSpec, resolved: WeightsEnum | Path | None, seed: int) -> nn.Module:
    if isinstance(resolved, WeightsEnum):
        try:
            return spec.builder(weights=resolved, progress=False)
        except Exception as e:
            target = cached_weights_path(resolved)
            state = "is there but could not be loaded" if target.exists() else "is missing"
            raise WeightsNotFoundError(
                f"pretrained weights {resolved} for {spec.name} are not available: the cache "
                f"file {target} {state}, and downloading it failed ({type(e).__name__}: {e}).\n"
                f"Fix: on a machine with network access download {resolved.url} and place it at "
                f"{target} (set TORCH_HOME to use another cache), or pass the file with "
                f"--weights path/to/{target.name}. Use --weights none for random init."
            ) from e
    kwargs: dict = {}
    if spec.family in ("googlenet", "inception"):
        # torchvision builds these with transform_input=True whenever it loads ImageNet
        # weights; checkpoints are taken to descend from those, random init from none.
        kwargs = {"init_weights": resolved is None, "transform_input": resolved is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.builder(weights=None, **kwargs)


def _cut(model: nn.Module, surgery: Surgery, aux: tuple[str, ...]) -> set[str]:
    """Apply ``surgery`` in place; return the state_dict keys it removed."""
    before = set(model.state_dict())
    if callable(surgery):
        surgery(model)
    for path, make in surgery if not callable(surgery) else ():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, make())
    for name in aux:
        setattr(model, name, None)
    if aux:
        model.aux_logits = False
    return before - set(model.state_dict())


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


# --- the embedder --------------------------------------------------------------------


class Embedder(nn.Module):
    """A frozen backbone cut at ``layer``.

    ``forward``: (B, C, H, W) float, normalised per :attr:`preprocessing` ->
    (B, :attr:`dim`) float. Always in eval mode with gradients off.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: BackboneSpec,
        layer: Layer,
        weights: WeightsInfo,
        preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.layer = layer
        self.weights = weights
        self.preprocessing = preprocessing

    @property
    def dim(self) -> int:
        return self.spec.dims[self.layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> Embedder:
        # frozen: BatchNorm statistics and dropout stay in inference behaviour
        return super().train(False)

    def provenance(self) -> dict:
        """What made these embeddings, for the output's metadata."""
        return {
            "backbone": self.spec.name,
            "family": self.spec.family,
            "source": self.spec.source,
            "layer": self.layer.value,
            "dim": self.dim,
            "weights": self.weights.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
        }


def _materialise(
    spec: BackboneSpec, weights: str, *, seed: int, key_map: str | None, cut: Surgery | None
) -> tuple[nn.Module, WeightsInfo, WeightsEnum | Path | str | None]:
    """Build ``spec`` with ``weights``, apply ``cut`` (``None``: keep the whole network),
    and describe the weights. Checkpoints load strictly after the cut, so keys of a
    removed head are the only ones ignored."""
    resolved = resolve_weights(spec, weights)
    if key_map is not None and not isinstance(resolved, Path):
        raise WeightsError("--weights-key-map applies to checkpoint files only")
    if isinstance(resolved, str):
        model, info = spec.pretrained[resolved]()
    else:
        model = _build(spec, resolved, seed)
    removed = _cut(model, cut, _AUX.get(spec.family, ())) if cut is not None else set()
    if isinstance(resolved, Path):
        state = load_state_dict(resolved)
        if key_map is not None:
            state = parse_key_map(key_map)(state)
        load_into(model, state, removed, what=f"checkpoint {resolved}", spec=spec)
        info = WeightsInfo(
            WeightsKind.CHECKPOINT, str(resolved), pretrained=True, sha256=_sha256(resolved),
            key_map=key_map,
        )
    elif isinstance(resolved, WeightsEnum):
        info = WeightsInfo(WeightsKind.TORCHVISION, str(resolved), pretrained=True, url=resolved.url)
    elif resolved is None:
        info = WeightsInfo(WeightsKind.NONE, "none", pretrained=False, seed=seed)
    return model, info, resolved


def load_backbone(
    name: str,
    *,
    weights: str = "DEFAULT",
    layer: Layer | str = Layer.GAP,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
    key_map: str | None = None,
) -> Embedder:
    """Build ``name`` with ``weights``, cut at ``layer``, frozen, on the CPU.

    ``preprocessing`` overrides the one published with the weights. ``seed`` makes
    ``weights="none"`` reproducible: the same seed gives the same random network.
    ``key_map`` (see :mod:`embedpipe.keymaps`) renames a checkpoint's keys before the
    strict load.
    """
    spec = get_spec(name)
    layer = Layer(layer)
    if layer not in spec.dims:
        raise ValueError(f"{name} has no layer {layer.value!r}; choose one of {list(spec.dims)}")
    model, info, resolved = _materialise(spec, weights, seed=seed, key_map=key_map, cut=spec.cut[layer])
    if preprocessing is None:
        preprocessing = spec.preprocessing(resolved if isinstance(resolved, WeightsEnum) else None)
    return Embedder(model, spec=spec, layer=layer, weights=info, preprocessing=preprocessing)


def load_classifier(
    name: str, *, weights: str = "DEFAULT", seed: int = 0, key_map: str | None = None
) -> tuple[nn.Module, WeightsInfo, Preprocessing]:
    """The whole network, classifier head included, in eval mode (for class-logit
    saliency and top-k predictions). A checkpoint must then hold the head too."""
    spec = get_spec(name)
    model, info, resolved = _materialise(spec, weights, seed=seed, key_map=key_map, cut=None)
    preprocessing = spec.preprocessing(resolved if isinstance(resolved, WeightsEnum) else None)
    return model.eval(), info, preprocessing


def available_weights(spec: BackboneSpec) -> list[str]:
    """``--weights`` names of ``spec`` usable without a download on this machine."""
    if spec.weights_enum is None:
        return spec.pretrained_offline()
    return [w.name for w in spec.weights_enum if cached_weights_path(w).is_file()]



