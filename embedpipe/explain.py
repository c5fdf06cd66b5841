"""See what a backbone sees: first-layer filters, feature maps, gradient saliency, and
query-beside-neighbours galleries.

The module has three layers, in the direction data flows:

* **compute** — tensors or arrays in, numpy arrays out, no files: :func:`first_conv`,
  :func:`filter_grid`, :func:`feature_maps`, :func:`top_feature_maps`,
  :func:`input_gradient`, :func:`smoothgrad`, :func:`saliency_map`, :func:`saliency`.
  Notebooks call these and plot the arrays however they like.
* **render** — arrays in, PNG bytes out, drawn with matplotlib's object-oriented API on
  the Agg canvas (no display, no pyplot state). Nothing here is computed that the picture
  does not need: layout, colour maps and thumbnails only.
* **files** — what ``embedpipe explain`` calls: load a backbone and images, compute,
  render, write a PNG. The caller opens nothing.

Saliency follows Simonyan et al. (2014) as commonly taught: forward the preprocessed image,
back-propagate one scalar to the input, take the largest absolute gradient across colour
channels, normalise. The scalar is a class logit (:class:`ClassTarget`, needs the
classifier head) or the cosine similarity of the image's embedding to another image's
(:class:`NeighbourTarget`): "why are these two neighbours", which works for any backbone,
headless ones included. SmoothGrad (Smilkov et al., 2017) averages the gradient over
noisy copies of the input, because a plain gradient is dominated by high-frequency noise.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from torch import nn

from .backbones import Embedder, get_spec, load_backbone, load_classifier
from .config import DEFAULT_MAX_PIXELS, Choice, DecodeMode
from .errors import ExplainError, ImageDecodeError, UnknownLayerError, WeightsError, did_you_mean
from .figures import DPI, png, shorten, show_pixels, titled_figure
from .files import atomic_write_bytes
from .images.decode import DecodeFailure, decode_file
from .images.preprocess import Preprocessing
from .provenance import WeightsInfo, WeightsKind

logger = logging.getLogger(__name__)


# --- compute: the network ------------------------------------------------------------


def network(model: nn.Module) -> nn.Module:
    """The network inside an :class:`Embedder`, so that layer names are the module paths
    of the torchvision/timm model (``layer1``, ``features.3``), not ``model.layer1``."""
    return model.model if isinstance(model, Embedder) else model


def layer_names(model: nn.Module) -> list[str]:
    """Top-level and second-level module paths of ``model``, in registration order.

    Deeper paths (``layer1.0.conv1``) are valid layers too; these are the ones worth
    listing in an error message.
    """
    names = []
    for name, child in network(model).named_children():
        if child is None:
            continue
        names.append(name)
        names.extend(f"{name}.{sub}" for sub, m in child.named_children() if m is not None)
    return names


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The module at dotted path ``name``; an unknown name lists the valid choices."""
    net = network(model)
    try:
        if not name:
            raise AttributeError(name)
        module = net.get_submodule(name)
        if module is None:
            raise AttributeError(name)
        return module
    except AttributeError:
        choices = layer_names(net)
        raise UnknownLayerError(
            f"{type(net).__name__} has no layer {name!r}.{did_you_mean(name, choices)} Valid layers (top- and "
            f"second-level modules; any deeper dotted path works too): {', '.join(choices)}"
        ) from None


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` in registration order (``features.0``, ``conv1``,
    ``conv_stem``): the layer that sees the pixels in every CNN the registry builds."""
    for name, module in network(model).named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ExplainError(f"{type(network(model)).__name__} has no Conv2d layer to show filters of")


def _check_eval(model: nn.Module) -> None:
    # an Embedder keeps its own flag at the default; what matters is the network inside
    if any(m.training for m in network(model).modules()):
        raise ExplainError(
            "the model is in training mode: BatchNorm and dropout would make the result "
            "depend on the batch and on chance. Call model.eval() first."
        )


def _as_batch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(C, H, W) or (1, C, H, W) -> (1, C, H, W) tensor, dtype kept."""
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ExplainError(
            f"expected one image, (C, H, W) or (1, C, H, W); got shape {tuple(x.shape)}"
        )
    return x


# --- compute: filters ----------------------------------------------------------------


def grid_columns(n: int) -> int:
    """Columns for ``n`` tiles: ``ceil(sqrt(n))``, widened up to twice that when a wider
    grid is full (32 -> 8x4, not 6x6 with four empty cells)."""
    base = max(1, math.ceil(math.sqrt(n)))
    return next((c for c in range(base, 2 * base + 1) if n % c == 0), base)


def tile(
    images: np.ndarray, *, columns: int | None = None, pad: int = 1, fill: float = 1.0
) -> np.ndarray:
    """(N, h, w, C) -> one (rows*(h+pad)+pad, columns*(w+pad)+pad, C) image, row-major.

    ``columns`` defaults to :func:`grid_columns`; ``rows = ceil(N / columns)``; separators
    and unused cells are ``fill``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ExplainError(f"tile expects (N, h, w, C) images, got shape {images.shape}")
    n, h, w, c = images.shape
    columns = columns or grid_columns(n)
    rows = max(1, math.ceil(n / columns))
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = images[i]
    return out


def filter_grid(
    weights: np.ndarray | torch.Tensor, *, columns: int | None = None, pad: int = 1
) -> np.ndarray:
    """Convolution weights (N, C, kh, kw) -> a grid image, float32 in [0, 1].

    Each filter is min-max scaled on its own, over all its channels together, so that its
    colour balance survives. With C == 3 the tiles are RGB (channel 0 sees red: torchvision
    and timm models take RGB); otherwise each tile is the mean over input channels, in
    grey (C == 1 for LeNet-5). A constant filter becomes mid-grey. Shape:
    ``(rows*(kh+pad)+pad, columns*(kw+pad)+pad, 3 or 1)``, laid out as :func:`tile` does.
    """
    w = torch.as_tensor(weights).detach().cpu().numpy().astype(np.float32)
    if w.ndim != 4:
        raise ExplainError(f"filter weights must be (N, C, kh, kw), got shape {w.shape}")
    if w.shape[1] != 3:
        w = w.mean(axis=1, keepdims=True)
    tiles = w.transpose(0, 2, 3, 1)  # (N, kh, kw, C)
    lo = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - lo
    scaled = np.where(span > 0, (tiles - lo) / np.where(span > 0, span, 1.0), 0.5)
    return tile(scaled.astype(np.float32), columns=columns, pad=pad)


# --- compute: feature maps -----------------------------------------------------------


class _Stop(Exception):
    """Raised by the capture hook: nothing after the layer needs computing."""


def feature_maps(model: nn.Module, x: torch.Tensor | np.ndarray, layer: str) -> np.ndarray:
    """The activations of ``layer`` for one preprocessed image.

    ``x``: (C, H, W) or (1, C, H, W) normalised float. Returns (channels, h, w) float32.
    The forward pass stops at the layer. A layer whose output is not a (1, C, h, w)
    tensor (a classifier, a flatten) is refused.
    """
    net = network(model)
    module = get_layer(net, layer)
    _check_eval(net)
    captured: list = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(_as_batch(x))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ExplainError(f"layer {layer!r} did not run in the forward pass; choose another")
    out = captured[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExplainError(
            f"layer {layer!r} outputs {shape}, not a (1, C, H, W) feature map; choose a "
            f"convolutional stage, one of: {', '.join(layer_names(net))}"
        )
    return out[0].float().cpu().numpy()


def top_channels(maps: np.ndarray, n: int) -> np.ndarray:
    """(C, h, w) activations -> the indices of the ``n`` channels with the highest mean
    activation, highest first (ties: lower index first). (min(n, C),) int64."""
    means = np.asarray(maps, dtype=np.float64).mean(axis=(1, 2))
    return np.argsort(-means, kind="stable")[:n].astype(np.int64)


@dataclass(frozen=True)
class FeatureMaps:
    """The top channels of one layer for one image.

    ``maps``: (n, h, w) float32, highest mean first; ``channels``: (n,) int64 channel
    indices in the layer; ``means``: (n,) float32 mean activations; ``num_channels``:
    how many channels the layer has.
    """

    layer: str
    maps: np.ndarray
    channels: np.ndarray
    means: np.ndarray
    num_channels: int


def top_feature_maps(
    model: nn.Module, x: torch.Tensor | np.ndarray, layer: str, *, n: int = 16
) -> FeatureMaps:
    """:func:`feature_maps` of ``layer``, keeping the ``n`` channels of highest mean."""
    if n < 1:
        raise ExplainError(f"n must be >= 1, got {n}")
    maps = feature_maps(model, x, layer)
    idx = top_channels(maps, n)
    return FeatureMaps(
        layer=layer,
        maps=maps[idx],
        channels=idx,
        means=maps[idx].mean(axis=(1, 2)).astype(np.float32),
        num_channels=maps.shape[0],
    )


# --- compute: saliency ---------------------------------------------------------------


class Target(Protocol):
    """The scalar whose input gradient is the saliency: network output (B, K) -> (B,)."""

    def score(self, output: torch.Tensor, model: nn.Module) -> torch.Tensor: ...


@dataclass(frozen=True)
class ClassTarget:
    """The logit of class ``index``; the model must end in its classifier head."""

    index: int

    def score(self, output: torch.Tensor, model: nn.Module) -> torch.Tensor:
        if isinstance(model, Embedder):
            raise ExplainError(
                f"{model.spec.name} as loaded is cut before its classifier head, so there is "
                "no class logit: load it with load_classifier, or use a NeighbourTarget"
            )
        if output.ndim != 2 or not 0 <= self.index < output.shape[1]:
            raise ExplainError(
                f"class index {self.index} is out of range: the network outputs "
                f"{tuple(output.shape[1:])}, classes 0..{output.shape[-1] - 1}"
            )
        return output[:, self.index]


@dataclass(frozen=True, eq=False)
class NeighbourTarget:
    """Cosine similarity of the image's embedding to ``embedding`` ((D,) float), another
    image's embedding by the same model: which pixels make the two images neighbours."""

    embedding: np.ndarray

    def score(self, output: torch.Tensor, model: nn.Module) -> torch.Tensor:
        ref = torch.as_tensor(np.asarray(self.embedding)).to(output.device, output.dtype).flatten()
        if output.ndim != 2 or output.shape[1] != ref.shape[0]:
            raise ExplainError(
                f"the reference embedding has {ref.shape[0]} dims but the model outputs "
                f"{tuple(output.shape[1:])}; embed both images with the same model"
            )
        return F.cosine_similarity(output, ref[None], dim=1)


def embed(model: nn.Module, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """One preprocessed image -> its (D,) output, for a :class:`NeighbourTarget`."""
    _check_eval(model)
    with torch.no_grad():
        return model(_as_batch(x))[0].cpu().numpy()


def input_gradient(
    model: nn.Module, x: torch.Tensor | np.ndarray, target: Target
) -> tuple[np.ndarray, np.ndarray]:
    """d target / d input for a batch, in the input's dtype (float64 for exact checks).

    ``x``: (B, C, H, W) normalised float, the network's input. Returns the gradient
    (B, C, H, W) and the target's value (B,). Each image's gradient is its own: the
    model is in eval mode, so images in a batch do not interact.
    """
    _check_eval(model)
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x[None]
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = target.score(model(x), model)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad.cpu().numpy(), scores.detach().cpu().numpy()


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: Target,
    *,
    samples: int = 25,
    noise: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """SmoothGrad: the input gradient averaged over ``samples`` noisy copies of ``x``.

    ``x``: (C, H, W) or (1, C, H, W). The noise is Gaussian with standard deviation
    ``noise * (x.max() - x.min())`` (Smilkov et al. find 10-20% works best), drawn from
    a generator seeded with ``seed``. The signed gradients are averaged, as in the paper;
    :func:`saliency_map` takes their magnitude. Returns (C, H, W) in ``x``'s dtype.
    """
    if samples < 1:
        raise ExplainError(f"SmoothGrad needs at least 1 sample, got {samples}")
    x = _as_batch(x)
    sigma = noise * float(x.max() - x.min())
    generator = torch.Generator().manual_seed(seed)
    total = None
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        eps = torch.randn((b, *x.shape[1:]), generator=generator, dtype=x.dtype).to(x.device)
        grad, _ = input_gradient(model, x + sigma * eps, target)
        total = grad.sum(axis=0) if total is None else total + grad.sum(axis=0)
    return total / samples


def saliency_map(gradient: np.ndarray, *, clip_percentile: float = 99.0) -> np.ndarray:
    """Input gradient (C, H, W) -> saliency (H, W) float32 in [0, 1].

    The largest absolute gradient across channels (Simonyan et al.), divided by its
    ``clip_percentile``-th percentile and clipped at 1: a handful of extreme pixels would
    otherwise set the scale and leave the rest of the map black. 100 divides by the
    maximum. An all-zero gradient gives an all-zero map.
    """
    g = np.asarray(gradient)
    if g.ndim != 3:
        raise ExplainError(f"expected a (C, H, W) gradient, got shape {g.shape}")
    s = np.abs(g).max(axis=0).astype(np.float64)
    scale = np.percentile(s, clip_percentile)
    if not scale > 0:
        scale = s.max()
    if not scale > 0:
        return np.zeros(s.shape, dtype=np.float32)
    return np.clip(s / scale, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Saliency:
    """``map``: (H, W) float32 in [0, 1]; ``gradient``: (C, H, W), the (SmoothGrad-
    averaged) input gradient it came from; ``score``: the target's value at the clean
    image; ``samples``: SmoothGrad samples, 0 for the plain gradient."""

    map: np.ndarray
    gradient: np.ndarray
    score: float
    samples: int


def saliency(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    target: Target,
    *,
    smoothgrad_samples: int = 0,
    noise: float = 0.15,
    seed: int = 0,
    clip_percentile: float = 99.0,
) -> Saliency:
    """Saliency of one preprocessed image ((C, H, W) or (1, C, H, W)) for ``target``;
    ``smoothgrad_samples`` > 0 averages that many noisy gradients instead."""
    x = _as_batch(x)
    grad, score = input_gradient(model, x, target)
    grad = grad[0]
    if smoothgrad_samples > 0:
        grad = smoothgrad(model, x, target, samples=smoothgrad_samples, noise=noise, seed=seed)
    return Saliency(
        map=saliency_map(grad, clip_percentile=clip_percentile),
        gradient=grad,
        score=float(score[0]),
        samples=smoothgrad_samples,
    )


# --- render: arrays -> PNG -----------------------------------------------------------


def render_filters(grid: np.ndarray, *, title: str, caption: str = "") -> bytes:
    """A :func:`filter_grid` image -> PNG; pixels stay square blocks, not blurred."""
    grid = np.asarray(grid)
    # integer upscaling: matplotlib's nearest-neighbour resampling at a fractional
    # factor would make some filter pixels a screen pixel wider than others
    factor = max(1, 440 // max(grid.shape[:2]))
    big = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    h, w = big.shape[:2]
    width = max(w / DPI, 5.6) + 0.2
    footer = 0.3 if caption else 0.0
    fig = titled_figure(width, h / DPI, title, footer=footer)
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()
    ax = fig.add_axes(
        (
            (fig_w - w / DPI) / 2 / fig_w,
            (footer + 0.05) / fig_h,
            w / DPI / fig_w,
            h / DPI / fig_h,
        )
    )
    if big.shape[2] == 1:
        ax.imshow(big[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(big, interpolation="nearest")
    ax.set_axis_off()
    if caption:
        fig.text(0.5, 0.08 / fig_h, caption, ha="center", va="bottom", fontsize=8)
    return png(fig)


def render_feature_maps(
    fm: FeatureMaps, image: np.ndarray, *, title: str, image_label: str = "input"
) -> bytes:
    """The input crop beside the top channels of one layer, each in viridis scaled to
    its own range (the channel's mean activation is in its label)."""
    n = len(fm.channels)
    cols = grid_columns(n)
    rows = max(1, math.ceil(n / cols))
    cell, label = 0.95, 0.2  # inches per map, and for its label above it
    body = rows * (cell + label)
    h, w = fm.maps.shape[1:]
    title = (
        f"{title}\n{fm.layer}: top {n} of {fm.num_channels} channels by mean activation "
        f"({h}×{w}, each scaled to its own range)"
    )
    # the input at about its own size: upsampling a photo only makes the PNG bigger
    side = min(body - 0.25, max(1.6, np.asarray(image).shape[0] / DPI))
    fig = titled_figure(side + 0.35 + cols * cell + 0.2, body, title, fontsize=9)
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()
    bottom = 0.1 / fig_h
    ax = fig.add_axes(
        (0.1 / fig_w, bottom + (body - 0.25 - side) / 2 / fig_h, side / fig_w, side / fig_h)
    )
    show_pixels(ax, np.asarray(image))
    ax.set_title(shorten(image_label, 40), fontsize=8, pad=2)
    x0 = side + 0.35
    for i in range(n):
        r, c = divmod(i, cols)
        y = bottom + (rows - 1 - r) * (cell + label) / fig_h
        ax = fig.add_axes(
            ((x0 + c * cell) / fig_w, y, (cell - 0.06) / fig_w, (cell - 0.06) / fig_h)
        )
        ax.imshow(fm.maps[i], cmap="viridis", interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"ch {fm.channels[i]} · {fm.means[i]:.2g}", fontsize=6.5, pad=2)
    return png(fig)


def _overlay(pixels: np.ndarray, sal: np.ndarray) -> np.ndarray:
    """Heat over a dimmed grey copy of the image: where the map is high the colour
    shows, where it is low the photo does."""
    base = pixels.astype(np.float32) / 255.0
    grey = base.mean(axis=2, keepdims=True) if base.ndim == 3 else base[:, :, None]
    heat = colormaps["inferno"](sal)[:, :, :3]
    alpha = sal[:, :, None]
    return np.clip((1 - alpha) * (0.15 + 0.6 * grey) + alpha * heat, 0, 1)


def render_saliency(
    pixels: np.ndarray,
    sal: np.ndarray,
    *,
    title: str,
    caption: str = "",
    reference: np.ndarray | None = None,
    reference_label: str = "neighbour",
    image_label: str = "input",
) -> bytes:
    """Input crop, saliency map and overlay side by side (and the reference image of a
    neighbour target). ``pixels``: (H, W, C) uint8; ``sal``: (H, W) in [0, 1]."""
    panels = 3 + (reference is not None)
    cell = 2.5
    footer = 0.3 if caption else 0.05
    width = max(panels * cell + 0.2, len(caption) * 8 * 0.6 / 72 + 0.4)
    fig = titled_figure(width, cell + 0.2, title, footer=footer)
    fig_w, fig_h = fig.get_figwidth(), fig.get_figheight()
    x0 = (fig_w - panels * cell) / 2
    axes = [
        fig.add_axes(
            (
                (x0 + i * cell + 0.04) / fig_w,
                footer / fig_h,
                (cell - 0.08) / fig_w,
                (cell - 0.08) / fig_h,
            )
        )
        for i in range(panels)
    ]
    show_pixels(axes[0], pixels)
    axes[0].set_title(shorten(image_label, 40), fontsize=8, pad=3)
    axes[1].imshow(sal, cmap="inferno", vmin=0, vmax=1)
    axes[1].set_axis_off()
    axes[1].set_title("saliency", fontsize=8, pad=3)
    axes[2].imshow(_overlay(pixels, sal))
    axes[2].set_axis_off()
    axes[2].set_title("overlay", fontsize=8, pad=3)
    if reference is not None:
        show_pixels(axes[3], reference)
        axes[3].set_title(reference_label, fontsize=8, pad=3)
    if caption:
        fig.text(0.5, 0.08 / fig_h, caption, ha="center", va="bottom", fontsize=8)
    return png(fig)


# --- files: what the CLI calls -------------------------------------------------------


class TargetKind(Choice):
    """What ``--target`` back-propagates: ``class:IDX`` or ``neighbour:OTHER_IMAGE``."""

    CLASS = "class"
    NEIGHBOUR = "neighbour"


def parse_target(text: str) -> tuple[TargetKind, str]:
    """``"class:967"`` -> (CLASS, "967"); ``"neighbour:b.jpg"`` -> (NEIGHBOUR, "b.jpg")."""
    kind, sep, value = text.partition(":")
    forms = "class:IDX (a logit of the classifier head) or neighbour:OTHER_IMAGE"
    if not sep or not value or kind not in TargetKind.values():
        raise ExplainError(f"cannot read target {text!r}; write {forms}")
    if kind == TargetKind.CLASS and not re.fullmatch(r"\d+", value):
        raise ExplainError(f"class index must be a non-negative integer, got {value!r} in {text!r}")
    return TargetKind(kind), value


def describe_model(backbone: str, weights: WeightsInfo) -> str:
    """ "<backbone> · <weights>" for figure titles; random weights say so."""
    if not weights.pretrained:
        seed = f", seed {weights.seed}" if weights.seed is not None else ""
        return f"{backbone} · random init{seed} (NOT pretrained)"
    if weights.kind == WeightsKind.CHECKPOINT:
        return f"{backbone} · checkpoint {Path(weights.name).name}"
    return f"{backbone} · {weights.name}"


def imagenet_categories(weights: WeightsInfo, num_classes: int) -> list[str] | None:
    """Class names for a pretrained 1000-class head, when the weights are known to be
    ImageNet-1k's (torchvision's enum says so; timm and the packaged Lite0 use its
    order); ``None`` for random init and checkpoints, whose classes are unknown."""
    if not weights.pretrained or num_classes != 1000:
        return None
    from torchvision.models import ResNet50_Weights, get_weight

    if weights.kind == WeightsKind.TORCHVISION:
        try:
            categories = get_weight(weights.name).meta.get("categories")
        except (ValueError, KeyError, AttributeError):
            return None
        return list(categories) if categories and len(categories) == 1000 else None
    if weights.kind in (WeightsKind.TIMM, WeightsKind.PACKAGE):
        return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    return None


def load_pixels(
    path: str | os.PathLike, preprocessing: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """A file -> the (crop, crop, C) uint8 pixels the network sees, decoded by the code
    extraction uses; an unreadable file raises :class:`ImageDecodeError` naming it."""
    result = decode_file(str(path), preprocessing, max_pixels=max_pixels, mode=DecodeMode.FULL)
    if isinstance(result, DecodeFailure):
        raise ImageDecodeError(result.error_type, f"{path}: {result.message}")
    return result.pixels


def _to_input(pixels: np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    from .extraction.forward import pixels_to_tensor

    # a copy: decoded pixels may be read-only, and torch warns about those
    return pixels_to_tensor(np.array(pixels[None]), preprocessing)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _weights_tag(weights: WeightsInfo, given: str) -> str:
    if weights.kind == WeightsKind.CHECKPOINT:
        return _slug(Path(weights.name).stem)
    if not weights.pretrained:
        return f"random-seed{weights.seed}"
    return _slug(given)


def _write(out_dir: str | os.PathLike, name: str, png: bytes) -> Path:
    """Readers see the old file or the new one, never half of one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    atomic_write_bytes(png, path)
    logger.info("wrote %s (%d bytes)", path, len(png))
    return path


def write_filters(
    out_dir: str | os.PathLike, *, backbone: str, weights: str = "DEFAULT", seed: int = 0
) -> Path:
    """The first convolution's filters of ``backbone`` as a grid ->
    ``out_dir/filters_<backbone>_<weights>.png``."""
    embedder = load_backbone(backbone, weights=weights, seed=seed)
    name, conv = first_conv(embedder)
    w = conv.weight
    grid = filter_grid(w)
    n, c, kh, kw = w.shape
    colour = "RGB" if c == 3 else ("grey" if c == 1 else f"mean of {c} input channels")
    caption = f"{name}: {n} filters, {c}×{kh}×{kw}, each min-max scaled on its own ({colour})"
    png = render_filters(grid, title=describe_model(backbone, embedder.weights), caption=caption)
    return _write(
        out_dir, f"filters_{_slug(backbone)}_{_weights_tag(embedder.weights, weights)}.png", png
    )


def write_feature_maps(
    image: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone: str,
    layer: str,
    weights: str = "DEFAULT",
    top: int = 16,
    seed: int = 0,
) -> Path:
    """The ``top`` channels of ``layer`` for ``image`` ->
    ``out_dir/featuremaps_<backbone>_<weights>_<image>_<layer>.png``."""
    embedder = load_backbone(backbone, weights=weights, seed=seed)
    get_layer(embedder, layer)  # an unknown layer fails before any image is decoded
    pixels = load_pixels(image, embedder.preprocessing)
    fm = top_feature_maps(embedder, _to_input(pixels, embedder.preprocessing), layer, n=top)
    png = render_feature_maps(
        fm,
        pixels,
        title=describe_model(backbone, embedder.weights),
        image_label=f"input: {Path(image).name}",
    )
    tag = _weights_tag(embedder.weights, weights)
    name = f"featuremaps_{_slug(backbone)}_{tag}_{_slug(Path(image).stem)}_{_slug(layer)}.png"
    return _write(out_dir, name, png)


def write_saliency(
    image: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backbone: str,
    target: str | None = None,
    weights: str = "DEFAULT",
    smoothgrad_samples: int = 0,
    seed: int = 0,
) -> Path:
    """Saliency of ``image`` for ``target`` (``class:IDX``, ``neighbour:OTHER_IMAGE``, or
    ``None`` for the predicted class) ->
    ``out_dir/saliency_<backbone>_<weights>_<image>_<target>[_smoothgrad<N>].png``.

    A class target loads the whole network with its head; a neighbour target only the
    backbone (GAP embedding), so it works for headless and user backbones too.
    """
    kind, value = parse_target(target) if target else (TargetKind.CLASS, None)
    method = f"SmoothGrad, {smoothgrad_samples} samples" if smoothgrad_samples else "plain gradient"
    reference = None
    if kind == TargetKind.NEIGHBOUR:
        model = load_backbone(backbone, weights=weights, seed=seed)
        info, preprocessing = model.weights, model.preprocessing
        pixels = load_pixels(image, preprocessing)
        reference = load_pixels(value, preprocessing)
        goal = NeighbourTarget(embed(model, _to_input(reference, preprocessing)))
        tag = f"neighbour-{_slug(Path(value).stem)}"
    else:
        if get_spec(backbone).family == "custom":
            raise ExplainError(
                f"{backbone} is a user backbone without a classifier head; use "
                "--target neighbour:OTHER_IMAGE"
            )
        try:
            model, info, preprocessing = load_classifier(backbone, weights=weights, seed=seed)
        except WeightsError as e:
            if not Path(weights).is_file():
                raise
            # a checkpoint of a fine-tuned backbone often has no head to load
            raise WeightsError(
                f"{e}\nA class target needs the whole network with its classifier head; "
                "--target neighbour:OTHER_IMAGE needs only the backbone."
            ) from e
        pixels = load_pixels(image, preprocessing)
        with torch.no_grad():
            probs = torch.softmax(model(_to_input(pixels, preprocessing)), dim=1)[0].numpy()
        goal = ClassTarget(int(value) if value is not None else int(probs.argmax()))
        tag = f"class{goal.index}"
    x = _to_input(pixels, preprocessing)
    result = saliency(model, x, goal, smoothgrad_samples=smoothgrad_samples, seed=seed)
    if isinstance(goal, ClassTarget):
        names = imagenet_categories(info, len(probs))
        label = f" '{names[goal.index]}'" if names else ""
        top1 = int(probs.argmax())
        predicted = f"'{names[top1]}'" if names else f"class {top1}"
        caption = (
            f"target: logit of class {goal.index}{label} = {result.score:.2f} "
            f"(p {probs[goal.index]:.2f}; top-1 {predicted}, p {probs[top1]:.2f}) · {method}"
        )
    else:
        caption = (
            f"target: cosine of the embeddings of {Path(image).name} and {Path(value).name} "
            f"= {result.score:.3f} · {method}"
        )
        if result.score > 0.9999:
            # cosine is at its maximum: its gradient vanishes and the map shows only noise
            caption += " · identical embeddings: nothing to explain"
    png = render_saliency(
        pixels,
        result.map,
        title=f"{describe_model(backbone, info)} · saliency",
        caption=caption,
        reference=reference,
        image_label=f"input: {Path(image).name}",
        reference_label=f"neighbour: {Path(value).name}" if reference is not None else "",
    )
    name = (
        f"saliency_{_slug(backbone)}_{_weights_tag(info, weights)}_{_slug(Path(image).stem)}_{tag}"
        f"{f'_smoothgrad{smoothgrad_samples}' if smoothgrad_samples else ''}.png"
    )
    return _write(out_dir, name, png)
