"""What the registry holds for each backbone, and what a user's backbone returns."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import nn

from ..config import Layer
from ..images.preprocess import Preprocessing
from .families import Family, Surgery, get_family

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

    from ..provenance import WeightsInfo


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
            object.__setattr__(self, "cut", get_family(self.family).cuts)
        if set(self.dims) != set(self.cut):
            raise ValueError(f"{self.name}: dims {list(self.dims)} and cuts {list(self.cut)} differ")
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))

    @property
    def family_row(self) -> Family:
        """This backbone's row of the family table."""
        return get_family(self.family)

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


@dataclass(frozen=True)
class CustomBackbone:
    """What a user's backbone callable returns (see docs/backbones.md).

    ``model``: (B, C, H, W) normalised float -> (B, ``dim``) embeddings, in eval mode;
    ``preprocessing``: how images are prepared for it.
    """

    model: nn.Module
    dim: int
    preprocessing: Preprocessing

