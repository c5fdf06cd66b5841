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
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import WeightsEnum, get_model_builder, get_model_weights

from .config import Layer
from .errors import (
    DuplicateBackboneError,
    UnknownBackboneError,
    WeightsError,
    WeightsNotFoundError,
)
from .lenet import lenet5
from .preprocess import Preprocessing

# --- the cut: which modules to replace for each family and layer ---------------------

#: (dotted attribute path, factory of the replacement module)
Surgery = tuple[tuple[str, Callable[[], nn.Module]], ...]

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

    def __post_init__(self) -> None:
        if self.family not in _CUTS:
            raise ValueError(f"unknown family {self.family!r}; known: {sorted(_CUTS)}")
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))

    @property
    def input_size(self) -> int:
        return self.preprocessing().crop_size

    def weight_names(self) -> list[str]:
        """Names accepted by ``--weights`` besides ``none`` and a checkpoint path."""
        if self.weights_enum is None:
            return []
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
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WeightsInfo:
        return cls(**{**d, "kind": WeightsKind(d["kind"])})


_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(spec: BackboneSpec, weights: str) -> WeightsEnum | Path | None:
    """Interpret a ``--weights`` value: ``None`` (random), a weights enum, or a file."""
    if weights.lower() == "none":
        return None
    if Path(weights).is_file():
        return Path(weights).resolve()
    if _looks_like_path(weights):
        raise WeightsError(f"checkpoint file {weights!r} does not exist")
    if spec.weights_enum is None:
        raise WeightsError(
            f"{spec.name} has no published weights; use --weights none or a checkpoint path, "
            f"not {weights!r}"
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
    for path, make in surgery:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, make())
    for name in aux:
        setattr(model, name, None)
    if aux:
        model.aux_logits = False
    return before - set(model.state_dict())


def _load_checkpoint(model: nn.Module, path: Path, removed: set[str], spec: BackboneSpec) -> None:
    state = load_state_dict(path)
    result = model.load_state_dict(
        {k: v for k, v in state.items() if k not in removed}, strict=False
    )
    unexpected = [k for k in result.unexpected_keys if k not in removed]
    if result.missing_keys or unexpected:
        raise WeightsError(
            f"checkpoint {path} does not fit {spec.name}: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}. Was it saved from another "
            "architecture, or with prefixed names (e.g. 'module.' from DataParallel)?"
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


def load_backbone(
    name: str,
    *,
    weights: str = "DEFAULT",
    layer: Layer | str = Layer.GAP,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
) -> Embedder:
    """Build ``name`` with ``weights``, cut at ``layer``, frozen, on the CPU.

    ``preprocessing`` overrides the one published with the weights. ``seed`` makes
    ``weights="none"`` reproducible: the same seed gives the same random network.
    """
    spec = get_spec(name)
    layer = Layer(layer)
    if layer not in spec.dims:
        raise ValueError(f"{name} has no layer {layer.value!r}; choose one of {list(spec.dims)}")
    resolved = resolve_weights(spec, weights)
    model = _build(spec, resolved, seed)
    removed = _cut(model, _CUTS[spec.family][layer], _AUX.get(spec.family, ()))
    if isinstance(resolved, Path):
        _load_checkpoint(model, resolved, removed, spec)
        info = WeightsInfo(
            WeightsKind.CHECKPOINT, str(resolved), pretrained=True, sha256=_sha256(resolved)
        )
    elif isinstance(resolved, WeightsEnum):
        info = WeightsInfo(WeightsKind.TORCHVISION, str(resolved), pretrained=True, url=resolved.url)
    else:
        info = WeightsInfo(WeightsKind.NONE, "none", pretrained=False, seed=seed)
    if preprocessing is None:
        preprocessing = spec.preprocessing(resolved if isinstance(resolved, WeightsEnum) else None)
    return Embedder(model, spec=spec, layer=layer, weights=info, preprocessing=preprocessing)


def iter_cached_weights(spec: BackboneSpec) -> Iterator[WeightsEnum]:
    """The weights of ``spec`` already present in the local torchvision cache."""
    if spec.weights_enum is None:
        return
    for w in spec.weights_enum:
        if cached_weights_path(w).is_file():
            yield w


