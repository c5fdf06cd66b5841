"""Backbones: frozen pretrained CNNs cut at a named layer.

A backbone is a frozen CNN cut at a named layer:

* ``gap`` — the global average pool of the last convolutional feature map, exactly as
  the torchvision model computes it on the way to its classifier (DenseNet's final ReLU
  included, Inception's ``transform_input`` included, auxiliary heads off).
* ``penultimate`` — the input of the final classifier layer (AlexNet/VGG fc7, LeNet-5's
  F6, MobileNetV3's 1280-d hidden layer, ConvNeXt's normalised pool).

The modules, in the order they build on each other: ``families`` (one row per family:
cuts, auxiliary heads, fine-tuning defaults, build flags), ``spec`` (what is registered),
``registry`` (names -> specs), ``weights`` (resolving and reading weights), ``embedder``
(building, cutting, freezing), ``timm``, ``lenet`` and ``keymaps``.
"""

from .embedder import Embedder, available_weights, load_backbone, load_classifier
from .families import FAMILIES, AuxHead, Family, get_family
from .registry import ENTRY_POINT_GROUP, get_spec, list_backbones, register, user_spec
from .spec import BackboneSpec, CustomBackbone
from .weights import cached_weights_path, load_state_dict, resolve_weights

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "AuxHead",
    "BackboneSpec",
    "CustomBackbone",
    "Embedder",
    "Family",
    "available_weights",
    "cached_weights_path",
    "get_family",
    "get_spec",
    "list_backbones",
    "load_backbone",
    "load_classifier",
    "load_state_dict",
    "register",
    "resolve_weights",
    "user_spec",
]
