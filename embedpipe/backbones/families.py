"""One row per backbone family: where to cut it for each layer, its auxiliary heads, what
fine-tuning unfreezes by default, and how torchvision builds it.

The registry, fine-tuning and explain read this table; adding a family touches it alone.
A cut replaces the modules after the embedding with ``Identity`` (or a pool), so the
classifier head is never computed and every remaining parameter keeps torchvision's name:
checkpoints load into the cut model with the same keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from ..config import Layer
from ..errors import UnknownBackboneError, did_you_mean

#: (dotted attribute path, factory of the replacement module) pairs, or a function that
#: cuts a model in place (timm's ``reset_classifier(0)``, say)
Surgery = tuple[tuple[str, Callable[[], nn.Module]], ...] | Callable[[nn.Module], None]

_FC: Surgery = (("fc", nn.Identity),)
_CLASSIFIER: Surgery = (("classifier", nn.Identity),)
_POOL_THEN_DROP_CLASSIFIER: Surgery = (
    ("avgpool", lambda: nn.AdaptiveAvgPool2d(1)),
    ("classifier", nn.Identity),
)


@dataclass(frozen=True)
class AuxHead:
    """An auxiliary classifier that runs only in training (GoogLeNet, Inception v3)."""

    module: str  # attribute of the model: ``aux1``
    output: str  # field of torchvision's training output: ``aux_logits1``
    loss_weight: float  # Szegedy et al. 2015: 0.3; the Inception v3 recipe: 0.4


@dataclass(frozen=True)
class Family:
    """How embedpipe treats every network of one family.

    ``cuts`` is empty for families whose specs carry their own cut (timm, user models).
    ``stages``: the modules whose outputs are the network's stages, shallow to deep, for
    :mod:`embedpipe.backbones.stages` (docs/depth.md). Each is a dotted module path of the
    whole (uncut) network, or a selector over the children of one module that resolves per
    model: ``features[MaxPool2d]`` (every child of that class, in order) or
    ``features[resolution]`` (the last child at each feature-map size: the module that
    closes each stage, found by a dummy forward). Empty: no stages known (timm models have
    their own mechanism, ``forward_intermediates``/``features_only``).
    ``unfreeze`` is what ``finetune --mode partial`` trains when ``--unfreeze`` is not
    given: the last stage. ``transform_input``: torchvision re-normalises the input inside
    the network when it builds these with ImageNet weights.
    """

    name: str
    cuts: Mapping[Layer, Surgery] = field(default_factory=dict)
    unfreeze: tuple[str, ...] = ()
    aux_heads: tuple[AuxHead, ...] = ()
    #: torchvision keeps the auxiliary heads of its pretrained weights (Inception v3) or
    #: drops them (GoogLeNet, whose published auxiliary weights were never trained)
    pretrained_aux: bool = False
    transform_input: bool = False
    stages: tuple[str, ...] = ()

    def build_kwargs(self, *, pretrained: bool) -> dict[str, bool]:
        """Builder flags for weights that descend (or not) from torchvision's ImageNet
        weights: GoogLeNet/Inception get ``transform_input`` exactly when they do."""
        if not self.transform_input:
            return {}
        return {"init_weights": not pretrained, "transform_input": pretrained}


_ROWS = (
    # features -> avgpool(6x6 / 7x7) -> flatten -> classifier(..., fc7, ReLU, [Dropout,] fc8)
    Family(
        "alexnet",
        {Layer.GAP: _POOL_THEN_DROP_CLASSIFIER, Layer.PENULTIMATE: (("classifier.6", nn.Identity),)},
        unfreeze=("features.10", "classifier"),
        stages=("features[MaxPool2d]",),  # features.2, .5, .12: the pools closing each block
    ),
    Family(
        "vgg",
        {Layer.GAP: _POOL_THEN_DROP_CLASSIFIER, Layer.PENULTIMATE: (("classifier.6", nn.Identity),)},
        unfreeze=("classifier",),
        stages=("features[MaxPool2d]",),  # pool1..pool5 (indices differ per depth and _bn)
    ),
    Family(
        "resnet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("layer4",),
        stages=("layer1", "layer2", "layer3", "layer4"),
    ),
    Family(
        "regnet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("trunk_output.block4",),
        stages=tuple(f"trunk_output.block{i}" for i in range(1, 5)),
    ),
    # conv5 (1x1 conv + BN + ReLU after stage4) is the feature map of `gap`
    Family(
        "shufflenet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("stage4", "conv5"),
        stages=("stage2", "stage3", "stage4", "conv5"),
    ),
    Family(
        "googlenet",
        {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
        unfreeze=("inception5a", "inception5b"),
        aux_heads=(AuxHead("aux1", "aux_logits1", 0.3), AuxHead("aux2", "aux_logits2", 0.3)),
        transform_input=True,
        stages=("inception3b", "inception4e", "inception5b"),  # the ends of strides 8, 16, 32
    ),
    Family(
        "inception",
        {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
        unfreeze=("Mixed_7a", "Mixed_7b", "Mixed_7c"),
        aux_heads=(AuxHead("AuxLogits", "aux_logits", 0.4),),
        pretrained_aux=True,
        transform_input=True,
        stages=("Mixed_5d", "Mixed_6e", "Mixed_7c"),  # 35x35, 17x17, 8x8 at 299 px
    ),
    # DenseNet's forward applies the final ReLU before its pool; cutting at the
    # classifier keeps it.
    Family(
        "densenet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.denseblock4", "features.norm5"),
        # each block's concatenated maps, before the transition's (or norm5's) BN-ReLU
        stages=tuple(f"features.denseblock{i}" for i in range(1, 5)),
    ),
    Family(
        "mobilenet_v2",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.17", "features.18"),
        stages=("features[resolution]",),  # features.1, .3, .6, .13, .18
    ),
    # classifier = Linear(C, hidden), Hardswish, Dropout, Linear(hidden, 1000); its last
    # blocks are tiny, so partial fine-tuning trains the whole (cheap) trunk
    Family(
        "mobilenet_v3",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: (("classifier.3", nn.Identity),)},
        unfreeze=("features",),
        stages=("features[resolution]",),  # small: features.0, .1, .3, .8, .12
    ),
    Family(
        "efficientnet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.7", "features.8"),
        stages=("features[resolution]",),  # B0: features.1, .2, .3, .5, .8 (strides 2..32)
    ),
    # classifier = LayerNorm2d, Flatten, Linear: gap is the raw pool, penultimate normed
    Family(
        "convnext",
        {Layer.GAP: (("classifier", lambda: nn.Flatten(1)),), Layer.PENULTIMATE: (("classifier.2", nn.Identity),)},
        unfreeze=("features.6", "features.7"),
        stages=("features.1", "features.3", "features.5", "features.7"),  # between downsamplers
    ),
    Family(
        "lenet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: (("classifier.2", nn.Identity),)},
        unfreeze=("features.6",),  # C5
        stages=("features.1", "features.4", "features.7"),  # tanh after C1, C3 and C5
    ),
    # timm models cut themselves (reset_classifier); the unfreeze stages are
    # EfficientNet-Lite0's. No `stages`: timm exposes them itself (forward_intermediates,
    # features_only with feature_info), which is the mechanism to use for timm models.
    Family("timm", unfreeze=("blocks.6", "conv_head", "bn2")),
    Family("custom"),
)

#: family name -> its row
FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _ROWS})


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownBackboneError(
            f"unknown backbone family {name!r}.{did_you_mean(name, FAMILIES)} "
            f"Known: {', '.join(FAMILIES)}"
        ) from None
