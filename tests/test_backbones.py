"""The registry, and embeddings that are exactly what torchvision's modules compute.

Each reference below runs a seeded torchvision model's stages by hand (or captures the
input of its final classifier layer with a hook during torchvision's own forward) and
is compared with the embedder built from the same seed.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import get_model

from embedpipe.backbones import (
    BackboneSpec,
    get_spec,
    list_backbones,
    load_backbone,
    register,
)
from embedpipe.backbones.lenet import lenet5
from embedpipe.config import Layer
from embedpipe.errors import (
    DuplicateBackboneError,
    UnknownBackboneError,
    WeightsError,
    WeightsNotFoundError,
)
from embedpipe.provenance import WeightsKind


def tv_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision model with the same seeded random init as ``weights="none"``."""
    torch.manual_seed(seed)
    if name == "lenet5":
        return lenet5().eval()
    if name in ("googlenet", "inception_v3"):
        kwargs = {"init_weights": True, **kwargs}
    return get_model(name, weights=None, **kwargs).eval()


def gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def ref_gap(name: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The global average pool of the last conv feature map, stage by stage."""
    family = get_spec(name).family
    if family in ("alexnet", "vgg", "mobilenet_v2", "mobilenet_v3", "efficientnet", "convnext", "lenet"):
        return gap(m.features(x))
    if family == "densenet":  # the final ReLU that torchvision applies in forward()
        return gap(F.relu(m.features(x)))
    if family == "resnet":
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return gap(m.layer4(m.layer3(m.layer2(m.layer1(x)))))
    if family == "regnet":
        return gap(m.trunk_output(m.stem(x)))
    if family == "shufflenet":
        x = m.maxpool(m.conv1(x))
        return gap(m.conv5(m.stage4(m.stage3(m.stage2(x)))))
    if family == "googlenet":
        x = m._transform_input(x)
        for stage in ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                      "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                      "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b"]:
            x = getattr(m, stage)(x)
        return gap(x)
    if family == "inception":
        x = m._transform_input(x)
        for stage in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                      "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                      "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                      "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            x = getattr(m, stage)(x)
        return gap(x)
    raise AssertionError(f"no reference for {family}")


def final_linear(m: nn.Module) -> nn.Linear:
    return [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]


def ref_penultimate(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the final classifier layer, captured during torchvision's forward."""
    seen = {}
    handle = final_linear(m).register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    m(x)
    handle.remove()
    return seen["x"]


# one representative per family (kept small: the whole file runs in well under a minute)
EXACT = {
    "alexnet": 64, "vgg11_bn": 64, "googlenet": 64, "inception_v3": 96, "resnet18": 64,
    "densenet121": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64,
    "convnext_tiny": 64, "regnet_y_400mf": 64, "shufflenet_v2_x1_0": 64, "lenet5": 32,
}


def test_every_family_has_an_exactness_case():
    """timm-built backbones are held to timm's own forward in test_timm_backbones.py."""
    families = {s.family for s in list_backbones() if s.family != "timm"}
    assert {get_spec(n).family for n in EXACT} == families


@pytest.mark.parametrize("name", EXACT)
@torch.inference_mode()
def test_embedding_is_exactly_torchvisions(name):
    size = EXACT[name]
    m = tv_model(name)
    torch.manual_seed(1)
    x = torch.randn(2, get_spec(name).preprocessing().channels, size, size)
    for layer, ref in [(Layer.GAP, ref_gap(name, m, x)), (Layer.PENULTIMATE, ref_penultimate(m, x))]:
        emb = load_backbone(name, weights="none", layer=layer, seed=0)
        out = emb(x)
        assert out.shape == (2, emb.dim)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gap_never_computes_the_classifier():
    emb = load_backbone("vgg11", weights="none", layer="gap")
    assert not [m for m in emb.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("spec", list_backbones(), ids=lambda s: s.name)
@pytest.mark.parametrize("layer", list(Layer))
def test_registry_dims_match_the_real_output(spec: BackboneSpec, layer):
    """Every registered backbone: embed(x).shape == (B, spec.dims[layer]).

    Run on the meta device (shapes without arithmetic), except RegNet whose builder
    computes its widths from tensors and needs real ones.
    """
    device = "cpu" if spec.family == "regnet" else "meta"
    p = spec.preprocessing()
    with torch.device(device):
        emb = load_backbone(spec.name, weights="none", layer=layer)
        size = p.crop_size if device == "meta" else 64
        out = emb(torch.empty(2, p.channels, size, size))
    assert tuple(out.shape) == (2, spec.dims[layer])


def test_seed_makes_random_init_reproducible():
    x = torch.randn(1, 3, 64, 64)
    a = load_backbone("resnet18", weights="none", seed=3)(x)
    b = load_backbone("resnet18", weights="none", seed=3)(x)
    c = load_backbone("resnet18", weights="none", seed=4)(x)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_random_init_is_labelled_as_such():
    w = load_backbone("resnet18", weights="none", seed=7).weights
    assert (w.kind, w.name, w.pretrained, w.seed) == (WeightsKind.NONE, "none", False, 7)


# --- checkpoints ---------------------------------------------------------------------


def test_checkpoint_state_dict_round_trip(tmp_path: Path):
    m = tv_model("resnet18", seed=5)
    path = tmp_path / "r18.pth"
    torch.save(m.state_dict(), path)
    emb = load_backbone("resnet18", weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(emb(x), ref_gap("resnet18", m, x))
    assert emb.weights.kind == WeightsKind.CHECKPOINT and emb.weights.pretrained
    assert emb.weights.name == str(path.resolve()) and len(emb.weights.sha256) == 64


def test_checkpoint_wrapped_with_another_head_loads(tmp_path: Path):
    """A fine-tuned checkpoint: a dict with metadata, a 7-class head that gap ignores."""
    m = tv_model("resnet18", seed=5, num_classes=7)
    path = tmp_path / "ft.pt"
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(load_backbone("resnet18", weights=str(path))(x), ref_gap("resnet18", m, x))


def test_checkpoint_googlenet_uses_transform_input(tmp_path: Path):
    """Checkpoints descend from ImageNet weights, so like torchvision's pretrained
    GoogLeNet they get transform_input=True (aux heads saved or not)."""
    m = tv_model("googlenet", seed=2, transform_input=True)
    path = tmp_path / "g.pth"
    torch.save(m.state_dict(), path)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(load_backbone("googlenet", weights=str(path))(x), ref_gap("googlenet", m, x))


def test_safetensors_checkpoint(tmp_path: Path):
    from safetensors.torch import save_file

    m = tv_model("lenet5", seed=1)
    path = tmp_path / "lenet.safetensors"
    save_file(m.state_dict(), str(path))
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(load_backbone("lenet5", weights=str(path))(x), ref_gap("lenet5", m, x))


def test_checkpoint_key_mismatch_lists_the_keys(tmp_path: Path):
    state = {f"module.{k}": v for k, v in tv_model("resnet18").state_dict().items()}
    path = tmp_path / "dp.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys \['conv1.weight'.*unexpected keys \['module.conv1.weight'"):
        load_backbone("resnet18", weights=str(path))


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path):
    path = tmp_path / "r34.pth"
    torch.save(tv_model("resnet34").state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        load_backbone("resnet18", weights=str(path))


def test_not_a_state_dict(tmp_path: Path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read checkpoint"):
        load_backbone("resnet18", weights=str(path))


def test_missing_checkpoint_file():
    with pytest.raises(WeightsError, match="does not exist"):
        load_backbone("resnet18", weights="nowhere/model.pth")


# --- torchvision weights -------------------------------------------------------------


def test_missing_pretrained_weights_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "th" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(WeightsNotFoundError) as e:
        load_backbone("resnet50", weights="DEFAULT")
    msg = str(e.value)
    assert "ResNet50_Weights.IMAGENET1K_V2" in msg and str(expected) in msg
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in msg
    assert "--weights none" in msg


def _cache_as(monkeypatch, tmp_path, payload_path):
    """Make ResNet18_Weights.IMAGENET1K_V1 resolve to ``payload_path``'s bytes, under a
    cache name whose hash prefix matches them (as torchvision names its files)."""
    import hashlib

    import embedpipe.backbones.weights as bw

    digest = hashlib.sha256(payload_path.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / f"resnet18-{digest[:8]}.pth"
    cached.parent.mkdir(exist_ok=True)
    cached.write_bytes(payload_path.read_bytes())
    monkeypatch.setattr(bw, "cached_weights_path", lambda weights: cached)
    return cached


def test_torchvision_weights_load_without_unpickling_and_equal_torchvision(tmp_path, monkeypatch):
    torch.manual_seed(0)
    reference = get_model("resnet18")
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    _cache_as(monkeypatch, tmp_path, tmp_path / "w.pth")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    emb = load_backbone("resnet18", weights="IMAGENET1K_V1")
    assert loads == [True]  # the only load, and with weights_only
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    with torch.inference_mode():
        torch.testing.assert_close(emb(x), reference.eval()(x))
    assert emb.weights.name == "ResNet18_Weights.IMAGENET1K_V1" and emb.weights.pretrained


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['EMBEDPIPE_PWNED']}",))


def test_a_pickle_in_the_weights_cache_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EMBEDPIPE_PWNED", str(marker))
    torch.save({"fc.weight": _Exploit()}, tmp_path / "evil.pth")
    _cache_as(monkeypatch, tmp_path, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        load_backbone("resnet18", weights="IMAGENET1K_V1")
    assert not marker.exists()


def test_a_damaged_cache_file_is_refused_by_its_hash(tmp_path, monkeypatch):
    torch.manual_seed(0)
    torch.save(get_model("resnet18").state_dict(), tmp_path / "w.pth")
    cached = _cache_as(monkeypatch, tmp_path, tmp_path / "w.pth")
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(WeightsError, match=r"sha256 does not start with [0-9a-f]{8}.*Delete the file"):
        load_backbone("resnet18", weights="IMAGENET1K_V1")


@pytest.mark.parametrize("recorded, expected", [(None, True), ({"transform_input": False}, False)])
def test_checkpoints_are_built_as_they_were_trained(tmp_path, recorded, expected):
    """A GoogLeNet fine-tuned from random init was trained without transform_input; a
    checkpoint that says nothing is taken to descend from the ImageNet weights."""
    torch.manual_seed(0)
    state = get_model("googlenet", weights=None, aux_logits=False, init_weights=False).state_dict()
    payload = {"state_dict": state}
    if recorded is not None:
        payload["embedpipe_finetune"] = {"build": recorded}
    torch.save(payload, tmp_path / "g.pt")
    emb = load_backbone("googlenet", weights=str(tmp_path / "g.pt"))
    assert emb.model.transform_input is expected


def test_weights_enum_names_select_their_own_preprocessing():
    spec = get_spec("resnet50")
    v1 = spec.preprocessing(spec.weights_enum["IMAGENET1K_V1"])
    v2 = spec.preprocessing(spec.weights_enum["IMAGENET1K_V2"])
    assert (v1.resize_size, v2.resize_size) == (256, 232)
    assert spec.preprocessing().resize_size == 232  # none/checkpoints: the DEFAULT's


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(WeightsError, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        load_backbone("resnet50", weights="IMAGENET22K")


def test_lenet_has_no_published_weights():
    with pytest.raises(WeightsError, match="no published weights"):
        load_backbone("lenet5", weights="DEFAULT")


# --- registry ------------------------------------------------------------------------


def test_unknown_backbone_suggests_a_close_name():
    with pytest.raises(UnknownBackboneError, match="Did you mean resnet50"):
        get_spec("resnet05")


def test_duplicate_registration_is_an_error():
    spec = get_spec("resnet18")
    with pytest.raises(DuplicateBackboneError):
        register(spec)


def test_seed_family_is_registered():
    names = {s.name for s in list_backbones()}
    required = {"alexnet", "googlenet", "inception_v3", "lenet5", "densenet121",
                "mobilenet_v3_large", "convnext_tiny", "convnext_small"}
    required |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    required |= {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
    required |= {f"efficientnet_b{i}" for i in range(4)}
    assert required <= names
    assert any(n.startswith("regnet_y_") for n in names)
