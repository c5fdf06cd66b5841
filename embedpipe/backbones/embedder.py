"""Building a backbone: weights in, cut at a layer, frozen; the :class:`Embedder`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import WeightsEnum

from ..config import Layer
from ..errors import WeightsError, WeightsNotFoundError
from ..files import sha256_file
from ..images.preprocess import Preprocessing
from ..provenance import Provenance, WeightsInfo, WeightsKind
from .families import AuxHead, Surgery
from .keymaps import parse_key_map
from .registry import get_spec
from .spec import BackboneSpec
from .weights import (
    cached_weights_path,
    load_checkpoint,
    load_into,
    resolve_weights,
    torchvision_state_dict,
)


def _build(
    spec: BackboneSpec, resolved: WeightsEnum | Path | None, seed: int, build: dict[str, bool] | None = None
) -> nn.Module:
    """The whole network: torchvision's architecture with ``resolved`` weights loaded
    (torchvision enums), or seeded random init (``None``, and checkpoints, which
    :func:`_materialise` loads after the cut; ``build``: the flags a checkpoint recorded)."""
    family = spec.family_row
    if isinstance(resolved, WeightsEnum):
        try:
            state = torchvision_state_dict(resolved)
        except WeightsError:
            raise
        except Exception as e:
            target = cached_weights_path(resolved)
            raise WeightsNotFoundError(
                f"pretrained weights {resolved} for {spec.name} are not available: the cache "
                f"file {target} is missing, and downloading it failed ({type(e).__name__}: {e}).\n"
                f"Fix: on a machine with network access download {resolved.url} and place it at "
                f"{target} (set TORCH_HOME to use another cache), or pass the file with "
                f"--weights path/to/{target.name}. Use --weights none for random init."
            ) from e
        # the arguments torchvision's builder passes itself when it loads these weights
        aux = {"aux_logits": True} if family.aux_heads else {}
        model = spec.builder(
            weights=None, num_classes=len(resolved.meta["categories"]),
            **family.build_kwargs(pretrained=True), **aux,
        )
        model.load_state_dict(state)
        if family.aux_heads and not family.pretrained_aux:
            _drop_aux(model, family.aux_heads)
        return model
    # torchvision builds GoogLeNet/Inception with transform_input=True whenever it loads
    # ImageNet weights; checkpoints descend from those unless they record otherwise.
    kwargs = {**family.build_kwargs(pretrained=resolved is not None), **(build or {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.builder(weights=None, **kwargs)


def _drop_aux(model: nn.Module, heads: tuple[AuxHead, ...]) -> None:
    for head in heads:
        setattr(model, head.module, None)
    model.aux_logits = False


def _cut(model: nn.Module, surgery: Surgery, aux: tuple[AuxHead, ...]) -> set[str]:
    """Apply ``surgery`` in place; return the state_dict keys it removed."""
    before = set(model.state_dict())
    if callable(surgery):
        surgery(model)
    for path, make in surgery if not callable(surgery) else ():
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, make())
    if aux:
        _drop_aux(model, aux)
    return before - set(model.state_dict())


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

    def provenance(self) -> Provenance:
        """What makes these embeddings: backbone, layer, weights, preprocessing."""
        return Provenance(
            backbone=self.spec.name,
            family=self.spec.family,
            source=self.spec.source,
            layer=self.layer.value,
            dim=self.dim,
            weights=self.weights,
            preprocessing=self.preprocessing,
        )


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
        state, build = load_checkpoint(resolved) if isinstance(resolved, Path) else (None, None)
        model = _build(spec, resolved, seed, build)
    removed = _cut(model, cut, spec.family_row.aux_heads) if cut is not None else set()
    if isinstance(resolved, Path):
        if key_map is not None:
            state = parse_key_map(key_map)(state)
        load_into(model, state, removed, what=f"checkpoint {resolved}", spec=spec)
        info = WeightsInfo(
            WeightsKind.CHECKPOINT, str(resolved), pretrained=True, sha256=sha256_file(resolved),
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
