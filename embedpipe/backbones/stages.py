"""Embeddings of every stage of a network from one forward pass.

The ``gap`` layer is the global average pool of the last feature map; a network's earlier
stages (ResNet's layer1..layer3, VGG's pool1..pool4) carry less abstract features that
often transfer better to images far from ImageNet. :func:`stage_embedder` builds the network
cut before its head (as ``load_backbone(layer="gap")`` does) and puts a forward hook on each stage module: the hook global-average-pools
the module's output (B, C, H, W) -> (B, C) as it is produced, so one forward pass yields
every stage, and the pass stops after the deepest stage (the head is never computed).

The stage modules of each family are its row's ``stages`` in :mod:`.families`; selectors
there (``features[MaxPool2d]``, ``features[resolution]``) resolve per model here.

timm models publish their stages themselves: ``feature_info`` names the module that ends
each one (``act1, layer1 .. layer4`` for ResNets, ``stages.0 .. stages.3`` for ConvNeXt,
``blocks.0, .1, .2, .4, .6`` for EfficientNet-B0), and those module paths are the stage
names here. They come out of the model's own ``forward_intermediates`` (one pass that stops
after the deepest stage asked for), or, where a model has none, from hooks on those modules
(what ``features_only=True`` returns).

``gap`` may be one of the layers (``layers=("layer2", "layer3", "gap")``): the backbone's
own embedding, exactly ``load_backbone(name, layer="gap")``'s, from the same pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..config import Layer
from ..errors import UnknownLayerError, did_you_mean
from ..images.preprocess import Preprocessing
from ..provenance import WeightsInfo
from .embedder import load_backbone
from .registry import get_spec
from .spec import BackboneSpec
from .timm import timm_stages

#: the backbone's own embedding (its ``gap`` layer), named among stage modules
GAP = Layer.GAP.value

#: ``parent[selector]``: a selector over the children of ``parent``
_SELECTOR = re.compile(r"^(?P<parent>[\w.]*)\[(?P<selector>\w+)\]$")


class _Done(Exception):
    """Raised by the deepest stage's hook: everything after it is not needed."""


def _pooled_shapes(model: nn.Module, paths: Sequence[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Output shape (C, H, W) of each module in ``paths`` on the dummy input ``x``."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda m, i, o, p=p: shapes.__setitem__(p, tuple(o.shape[1:]))
        )
        for p in paths
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _check_path(model: nn.Module, path: str, name: str) -> None:
    names = dict(model.named_modules())
    if path not in names or path == "":
        raise UnknownLayerError(
            f"{name} has no module {path!r}.{did_you_mean(path, names)} Stages are module paths "
            f"of the whole network, e.g. {', '.join([n for n in names if n][:6])}; "
            f"list them with `dict({name}.named_modules())` or torchvision's get_graph_node_names"
        )


def resolve_stages(model: nn.Module, entries: Sequence[str], x: torch.Tensor, *, name: str) -> tuple[str, ...]:
    """Module paths of ``entries`` (paths or ``parent[selector]``), shallow to deep.

    ``parent[ClassName]``: every child of ``parent`` of that class, in order.
    ``parent[resolution]``: the last child of ``parent`` at each feature-map size, from a
    forward pass of ``x`` (B, C, H, W) float.
    """
    out: list[str] = []
    for entry in entries:
        m = _SELECTOR.match(entry)
        if m is None:
            _check_path(model, entry, name)
            out.append(entry)
            continue
        parent_path, selector = m["parent"], m["selector"]
        if parent_path:
            _check_path(model, parent_path, name)
        parent = model.get_submodule(parent_path)
        children = [f"{parent_path}.{c}" if parent_path else c for c, _ in parent.named_children()]
        if selector == "resolution":
            sizes = _pooled_shapes(model, children, x)
            ran = [c for c in children if c in sizes]
            out += [c for c, nxt in zip(ran, [*ran[1:], None]) if nxt is None or sizes[c][1:] != sizes[nxt][1:]]
        else:
            picked = [c for c in children if type(model.get_submodule(c)).__name__ == selector]
            if not picked:
                kinds = sorted({type(model.get_submodule(c)).__name__ for c in children})
                raise UnknownLayerError(
                    f"{name}: {entry!r} selects no module: {parent_path or 'the model'} has no child of "
                    f"class {selector!r}; its children are {', '.join(kinds)} (or use [resolution])"
                )
            out += picked
    return tuple(out)


class StageEmbedder(nn.Module):
    """A frozen network whose forward returns the global average pool of each stage.

    ``forward``: (B, C, H, W) float, normalised per :attr:`preprocessing` -> dict
    stage path -> (B, ``dims[path]``) float, in :attr:`stages` order, from ONE forward
    pass of :attr:`model` (hooks pool each stage output as it is produced; the pass stops
    after the deepest stage). Always in eval mode with gradients off.
    """

    def __init__(
        self, model: nn.Module, *, spec: BackboneSpec, stages: tuple[str, ...], dims: dict[str, int],
        weights: WeightsInfo, preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.stages = stages
        self.dims = dims
        self.weights = weights
        self.preprocessing = preprocessing
        self._pooled: dict[str, torch.Tensor] = {}
        # with gap the whole (cut) network runs; without, the pass ends at the deepest stage
        self._gap = GAP in stages
        modules = [p for p in stages if p != GAP]
        self._last = None if self._gap else modules[-1]
        self._attach(modules)

    def _attach(self, paths: list[str]) -> None:
        for path in paths:
            self.model.get_submodule(path).register_forward_hook(self._hook(path))

    def _hook(self, path: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            # pool now: a later in-place op may overwrite the output, and (B, C) is all we keep
            self._pooled[path] = output.mean(dim=(2, 3)) if output.ndim == 4 else torch.flatten(output, 1)
            if path == self._last and not torch.jit.is_tracing():
                raise _Done

        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._pooled = {}
        try:
            out = self.model(x)
            if self._gap:
                self._pooled[GAP] = torch.flatten(out, 1)
        except _Done:
            pass
        pooled, self._pooled = self._pooled, {}
        missing = [p for p in self.stages if p not in pooled]
        if missing:
            raise RuntimeError(f"{self.spec.name}: stages {missing} did not run in the forward pass")
        return {p: pooled[p] for p in self.stages}

    def train(self, mode: bool = True) -> StageEmbedder:
        return super().train(False)


class IntermediatesStageEmbedder(StageEmbedder):
    """A timm model's stages from its own ``forward_intermediates``: ``indices`` maps each
    stage (a ``feature_info`` module path) to its index there. Without ``gap`` the pass
    stops after the deepest stage asked for (``stop_early``); with it the pass runs to the
    end and ``forward_head`` of the final features is the gap vector."""

    def __init__(self, model: nn.Module, *, indices: dict[str, int], **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.indices = {p: indices[p] for p in self.stages if p != GAP}

    def _attach(self, paths: list[str]) -> None:
        pass  # no hooks: timm returns the intermediates itself

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        take = list(self.indices.values())
        pooled: dict[str, torch.Tensor] = {}
        if not take:
            maps = []
            pooled[GAP] = torch.flatten(self.model(x), 1)
        elif self._gap:
            final, maps = self.model.forward_intermediates(x, indices=take)
            pooled[GAP] = torch.flatten(self.model.forward_head(final), 1)
        else:
            maps = self.model.forward_intermediates(x, indices=take, stop_early=True, intermediates_only=True)
        if len(maps) != len(take):
            raise RuntimeError(
                f"{self.spec.name}: forward_intermediates returned {len(maps)} maps for {len(take)} stages"
            )
        for path, fmap in zip(self.indices, maps):
            pooled[path] = fmap.mean(dim=(2, 3))  # (B, C, H, W) -> (B, C)
        return {p: pooled[p] for p in self.stages}


def _entries(layers: Sequence[str] | str, default: Sequence[str]) -> tuple[str, ...]:
    """``layers`` as a tuple, ``"stages"`` (alone or in a list) expanded to ``default``."""
    entries = (layers,) if isinstance(layers, str) else tuple(layers)
    out: list[str] = []
    for e in entries:
        out += list(default) if e == "stages" else [e]
    return tuple(out)


def _ordered(name: str, stages: Sequence[str], order: Sequence[str]) -> tuple[str, ...]:
    """``stages`` in run order (``order``: module paths as they run), gap last; each once."""
    if len(set(stages)) != len(stages):
        raise UnknownLayerError(f"{name}: stages {list(stages)} repeat a module; name each once")
    return tuple(sorted(stages, key=lambda p: len(order) if p == GAP else order.index(p)))


def stage_embedder(
    name: str,
    *,
    weights: str = "DEFAULT",
    seed: int = 0,
    layers: Sequence[str] | str = "stages",
    key_map: str | None = None,
    input_size: int | None = None,
) -> StageEmbedder:
    """``name`` with ``weights`` (``"none"``: random init from ``seed``), frozen and cut before its head,
    returning pooled activations of ``layers`` from one forward pass.

    ``layers``: ``"stages"`` (the family's stages, :attr:`Family.stages`; for timm models
    their ``feature_info`` modules), module paths / selectors of the whole network, and
    ``"gap"`` (the backbone's own embedding). ``input_size``: side of the dummy (1, C, s, s)
    input that resolves ``[resolution]`` selectors and measures each stage's channels
    (default: the backbone's crop size).
    """
    spec = get_spec(name)
    asks_stages = "stages" in ((layers,) if isinstance(layers, str) else tuple(layers))
    if asks_stages and spec.family != "timm" and not spec.family_row.stages:  # before any download
        raise UnknownLayerError(
            f"{name} (family {spec.family!r}) has no known stages; pass module paths as layers=(...)"
        )
    # the network cut before its head, as for the gap layer: a checkpoint with another head
    # (a fine-tuned classifier) loads, and the head's keys are the only ones ignored
    cut = load_backbone(name, weights=weights, seed=seed, key_map=key_map, layer=Layer.GAP)
    model, info, preprocessing = cut.model.eval(), cut.weights, cut.preprocessing
    size = input_size or preprocessing.crop_size
    x = torch.zeros(1, preprocessing.channels, size, size)
    common = {"spec": spec, "weights": info, "preprocessing": preprocessing}
    # timm models name their own stages (feature_info); others take their family's row
    known = timm_stages(model) if spec.family == "timm" else ()
    if asks_stages and spec.family == "timm" and not known:
        raise UnknownLayerError(
            f"{name} publishes no stages (timm's feature_info is empty); pass module paths as "
            f"layers=(...), e.g. {', '.join([n for n, _ in model.named_children()][:6])}"
        )
    entries = _entries(layers, [n for n, _ in known] if known else spec.family_row.stages)
    if known and all(e == GAP or e in dict(known) for e in entries):
        return _timm_stages(model, name, entries, known, x, common)
    if known:
        names, modules = [n for n, _ in known], dict(model.named_modules())
        for e in entries:
            if e != GAP and e not in modules and not _SELECTOR.match(e):
                hint = did_you_mean(e, dict.fromkeys([*names, GAP, *modules]))
                raise UnknownLayerError(
                    f"{name} has no stage {e!r}.{hint} Its stages "
                    f"(timm's feature_info modules, shallow to deep): {', '.join(names)}; or gap (the "
                    "pooled embedding), or any module path of the model"
                )
    return _hooked(model, name, entries, x, common)


def _hooked(model: nn.Module, name: str, entries: Sequence[str], x: torch.Tensor, common: dict) -> StageEmbedder:
    """Stages from forward hooks on the modules ``entries`` name (and ``gap``)."""
    spec = common["spec"]
    stages = resolve_stages(model, [e for e in entries if e != GAP], x, name=name)
    shapes = _pooled_shapes(model, stages, x)
    dims = {p: int(shapes[p][0]) for p in stages}
    if GAP in entries:
        stages, dims[GAP] = (*stages, GAP), spec.dims[Layer.GAP]
    # deepest last: the hook of the module that runs last ends the pass
    stages = _ordered(name, stages, list(shapes))
    return StageEmbedder(model, stages=stages, dims={p: dims[p] for p in stages}, **common)


def _timm_stages(
    model: nn.Module, name: str, entries: Sequence[str], known: Sequence[tuple[str, int]], x: torch.Tensor,
    common: dict,
) -> StageEmbedder:
    """A timm model's ``feature_info`` stages (and gap): from ``forward_intermediates``
    where it lines up with ``feature_info``, else from hooks on those modules."""
    names = [n for n, _ in known]
    stages = _ordered(name, entries, names)
    dims = _intermediate_channels(model, known, x, gap=GAP in stages)
    if dims is None:  # no usable forward_intermediates: hook the feature_info modules
        made = _hooked(model, name, stages, x, common)
        wrong = {p: (made.dims[p], c) for p, c in known if p in made.dims and made.dims[p] != c}
        if wrong:
            raise UnknownLayerError(
                f"{name}: the outputs of its feature_info modules are not (B, C, H, W) maps with "
                f"the channels feature_info lists (stage: (got, listed) {wrong}); it cannot give stages here"
            )
        return made
    dims[GAP] = common["spec"].dims[Layer.GAP]
    return IntermediatesStageEmbedder(
        model, indices={n: i for i, n in enumerate(names)}, stages=stages, dims={p: dims[p] for p in stages},
        **common,
    )


def _intermediate_channels(
    model: nn.Module, known: Sequence[tuple[str, int]], x: torch.Tensor, *, gap: bool
) -> dict[str, int] | None:
    """Channels of each ``feature_info`` stage from one ``forward_intermediates`` pass of
    ``x``, or ``None`` when the model has no such method or its intermediates do not line up
    with ``feature_info`` (count, NCHW, channels) or, with ``gap``, its final features do not
    give the model's own embedding."""
    if not callable(getattr(model, "forward_intermediates", None)):
        return None
    # random, not zeros: a zero input can stay zero through a random-init network and hide a mismatch
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            final, maps = model.forward_intermediates(x)
            same_gap = not gap or torch.allclose(model.forward_head(final), model(x), rtol=1e-4, atol=1e-5)
    except (NotImplementedError, TypeError, AssertionError):
        return None
    if not same_gap or len(maps) != len(known):
        return None
    if any(m.ndim != 4 or m.shape[1] != c for m, (_, c) in zip(maps, known)):
        return None
    return {n: c for n, c in known}
