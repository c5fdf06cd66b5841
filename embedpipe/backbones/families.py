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
    ),
    Family(
        "vgg",
        {Layer.GAP: _POOL_THEN_DROP_CLASSIFIER, Layer.PENULTIMATE: (("classifier.6", nn.Identity),)},
        unfreeze=("classifier",),
    ),
    Family("resnet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("layer4",)),
    Family("regnet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("trunk_output.block4",)),
    Family("shufflenet", {Layer.GAP: _FC, Layer.PENULTIMATE: _FC}, unfreeze=("stage4", "conv5")),
    Family(
        "googlenet",
        {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
        unfreeze=("inception5a", "inception5b"),
        aux_heads=(AuxHead("aux1", "aux_logits1", 0.3), AuxHead("aux2", "aux_logits2", 0.3)),
        transform_input=True,
    ),
    Family(
        "inception",
        {Layer.GAP: _FC, Layer.PENULTIMATE: _FC},
        unfreeze=("Mixed_7a", "Mixed_7b", "Mixed_7c"),
        aux_heads=(AuxHead("AuxLogits", "aux_logits", 0.4),),
        pretrained_aux=True,
        transform_input=True,
    ),
    # DenseNet's forward applies the final ReLU before its pool; cutting at the
    # classifier keeps it.
    Family(
        "densenet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.denseblock4", "features.norm5"),
    ),
    Family(
        "mobilenet_v2",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.17", "features.18"),
    ),
    # classifier = Linear(C, hidden), Hardswish, Dropout, Linear(hidden, 1000); its last
    # blocks are tiny, so partial fine-tuning trains the whole (cheap) trunk
    Family(
        "mobilenet_v3",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: (("classifier.3", nn.Identity),)},
        unfreeze=("features",),
    ),
    Family(
        "efficientnet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: _CLASSIFIER},
        unfreeze=("features.7", "features.8"),
    ),
    # classifier = LayerNorm2d, Flatten, Linear: gap is the raw pool, penultimate normed
    Family(
        "convnext",
        {Layer.GAP: (("classifier", lambda: nn.Flatten(1)),), Layer.PENULTIMATE: (("classifier.2", nn.Identity),)},
        unfreeze=("features.6", "features.7"),
    ),
    Family(
        "lenet",
        {Layer.GAP: _CLASSIFIER, Layer.PENULTIMATE: (("classifier.2", nn.Identity),)},
        unfreeze=("features.6",),  # C5
    ),
    # timm models cut themselves (reset_classifier); the stages are EfficientNet-Lite0's
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
