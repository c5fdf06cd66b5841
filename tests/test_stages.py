"""Stage embeddings: each family's stages resolve to the expected torchvision modules, each
stage vector is that module's output pooled by hand, and all come from one forward pass."""

from __future__ import annotations

import pytest
import torch

from embedpipe.backbones import FAMILIES, get_spec, load_backbone, load_classifier
from embedpipe.backbones.stages import stage_embedder
from embedpipe.config import Layer
from embedpipe.errors import UnknownLayerError

# one small model per family: (name, input side, the stage modules written out by hand)
CASES = [
    ("resnet18", 64, ["layer1", "layer2", "layer3", "layer4"]),
    ("vgg11", 64, ["features.2", "features.5", "features.10", "features.15", "features.20"]),
    ("alexnet", 64, ["features.2", "features.5", "features.12"]),
    ("densenet121", 64, [f"features.denseblock{i}" for i in range(1, 5)]),
    ("googlenet", 64, ["inception3b", "inception4e", "inception5b"]),
    ("inception_v3", 75, ["Mixed_5d", "Mixed_6e", "Mixed_7c"]),  # 75: the smallest it takes
    ("mobilenet_v2", 64, ["features.1", "features.3", "features.6", "features.13", "features.18"]),
    ("mobilenet_v3_small", 64, ["features.0", "features.1", "features.3", "features.8", "features.12"]),
    ("efficientnet_b0", 64, ["features.1", "features.2", "features.3", "features.5", "features.8"]),
    ("convnext_tiny", 64, ["features.1", "features.3", "features.5", "features.7"]),
    ("regnet_y_400mf", 64, [f"trunk_output.block{i}" for i in range(1, 5)]),
    ("shufflenet_v2_x1_0", 64, ["stage2", "stage3", "stage4", "conv5"]),
    ("lenet5", 32, ["features.1", "features.4", "features.7"]),
]


def test_every_torchvision_family_is_covered():
    covered = {get_spec(name).family for name, _, _ in CASES}
    assert covered == {f.name for f in FAMILIES.values() if f.stages}
    assert not FAMILIES["timm"].stages and not FAMILIES["custom"].stages


@pytest.mark.parametrize("name, size, expected", CASES, ids=[c[0] for c in CASES])
def test_stages_are_the_modules_outputs_pooled_from_one_forward_pass(name, size, expected):
    emb = stage_embedder(name, weights="none", seed=0, input_size=size)
    assert list(emb.stages) == expected

    # the reference: the same seeded network, hooked by hand, pooled by hand
    ref, _, _ = load_classifier(name, weights="none", seed=0)
    captured = {}
    for path in expected:
        ref.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: captured.__setitem__(path, o.detach().clone())
        )
    channels = emb.preprocessing.channels
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref(x)
        calls = []
        emb.model.register_forward_pre_hook(lambda m, i: calls.append(1))
        out = emb(x)
    assert calls == [1], "every stage must come from one forward pass of the network"
    head = getattr(emb.model, "fc", None) or getattr(emb.model, "classifier", None)
    head_calls = []
    head.register_forward_pre_hook(lambda m, i: head_calls.append(1))
    with torch.inference_mode():
        emb(x)
    assert head_calls == [], "the pass stops after the deepest stage: the head never runs"
    assert list(out) == expected
    for path in expected:
        want = captured[path].mean((2, 3))
        assert out[path].shape == (2, emb.dims[path]) == want.shape
        torch.testing.assert_close(out[path], want, rtol=1e-5, atol=1e-6)


def test_explicit_layers_and_a_helpful_error_for_an_unknown_one():
    emb = stage_embedder("lenet5", weights="none", layers=("features.4", "features.1"))
    assert emb.stages == ("features.1", "features.4")  # run order
    assert emb.dims == {"features.1": 6, "features.4": 16}
    # gap among the layers: the backbone's own embedding, from the same pass
    emb = stage_embedder("lenet5", weights="none", layers=("gap", "features.4"))
    assert emb.stages == ("features.4", "gap") and emb.dims["gap"] == get_spec("lenet5").dims[Layer.GAP]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(emb(x)["gap"], load_backbone("lenet5", weights="none")(x))
    with pytest.raises(UnknownLayerError, match=r"no module 'features\.44'.*Did you mean features\.4"):
        stage_embedder("lenet5", weights="none", layers=("features.44",))
    with pytest.raises(UnknownLayerError, match="no child of class 'MaxPool2d'"):
        stage_embedder("lenet5", weights="none", layers=("features[MaxPool2d]",))
