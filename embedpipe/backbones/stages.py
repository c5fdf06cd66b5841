"""Embeddings of every stage of a network from one forward pass.

The ``gap`` layer is the global average pool of the last feature map; a network's earlier
stages (ResNet's layer1..layer3, VGG's pool1..pool4) carry less abstract features that
often transfer better to images far from ImageNet. :func:`stage_embedder` builds the network
cut before its head (as ``load_backbone(layer="gap")`` does) and puts a forward hook on each stage module: the hook global-average-pools
the module's output (B, C, H, W) -> (B, C) as it is produced, so one forward pass yields
every stage, and the pass stops after the deepest stage (the head is never computed).

The stage modules of each family are its row's ``stages`` in :mod:`.families`; selectors
there (``features[MaxPool2d]``, ``features[resolution]``) resolve per model here.
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
        self._last = stages[-1]
        for path in stages:
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
            self.model(x)
        except _Done:
            pass
        pooled, self._pooled = self._pooled, {}
        missing = [p for p in self.stages if p not in pooled]
        if missing:
            raise RuntimeError(f"{self.spec.name}: stages {missing} did not run in the forward pass")
        return {p: pooled[p] for p in self.stages}

    def train(self, mode: bool = True) -> StageEmbedder:
        return super().train(False)


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

    ``layers``: ``"stages"`` (the family's stages, :attr:`Family.stages`) or module paths /
    selectors of the whole network. ``input_size``: side of the dummy (1, C, s, s) input
    that resolves ``[resolution]`` selectors and measures each stage's channels (default:
    the backbone's crop size).
    """
    spec = get_spec(name)
    if layers == "stages":
        entries = spec.family_row.stages
        if not entries:
            raise UnknownLayerError(
                f"{name} (family {spec.family!r}) has no known stages; pass module paths as layers=(...)"
                + (", or use timm's forward_intermediates / features_only" if spec.family == "timm" else "")
            )
    elif isinstance(layers, str):
        entries = (layers,)
    else:
        entries = tuple(layers)
    # the network cut before its head, as for the gap layer: a checkpoint with another head
    # (a fine-tuned classifier) loads, and the head's keys are the only ones ignored
    cut = load_backbone(name, weights=weights, seed=seed, key_map=key_map, layer=Layer.GAP)
    model, info, preprocessing = cut.model, cut.weights, cut.preprocessing
    size = input_size or preprocessing.crop_size
    x = torch.zeros(1, preprocessing.channels, size, size)
    model.eval()
    stages = resolve_stages(model, entries, x, name=name)
    if len(set(stages)) != len(stages):
        raise UnknownLayerError(f"{name}: stages {list(stages)} repeat a module; name each once")
    shapes = _pooled_shapes(model, stages, x)
    dims = {p: int(shapes[p][0]) for p in stages}
    # deepest last: the hook of the module that runs last ends the pass
    order = list(shapes)
    stages = tuple(sorted(stages, key=order.index))
    return StageEmbedder(model, spec=spec, stages=stages, dims=dims, weights=info, preprocessing=preprocessing)
