"""Stages of timm models: named by timm's feature_info, each stage vector equal to the map
timm's own ``features_only=True`` model returns, pooled by hand, from one forward pass.

Random init only (``weights="none"``): these check the mechanism, not pretrained features.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import require
from PIL import Image
from torchvision import transforms

timm = require("timm", "timm backbones")

from embedpipe.backbones import load_backbone
from embedpipe.backbones.stages import IntermediatesStageEmbedder, StageEmbedder, stage_embedder
from embedpipe.cli import main
from embedpipe.errors import UnknownLayerError
from embedpipe.extraction.forward import embed_paths
from embedpipe.extraction.layers import stage_datasets
from embedpipe.store import read_embeddings

SIZE = 64
# (timm model, its feature_info modules written out by hand)
CASES = [
    ("resnet18", ["act1", "layer1", "layer2", "layer3", "layer4"]),
    ("convnext_atto", ["stages.0", "stages.1", "stages.2", "stages.3"]),
    # timm's features_only here is its own class (EfficientNetFeatures), not a wrapper
    ("efficientnet_b0", ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
]


@functools.cache
def timm_features(name: str) -> torch.nn.Module:
    """timm's own feature extractor with the weights ``--weights none --seed 0`` builds."""
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False)
    torch.manual_seed(0)
    feats = timm.create_model(name, pretrained=False, features_only=True).eval()
    # EfficientNetFeatures keeps the module names but builds no head, so draws other random
    # weights: load the plain model's. FeatureListNet renames the modules it flattens
    # (stages.0 -> stages_0) but builds the whole network first: the seed gives the same weights.
    missing, _ = feats.load_state_dict(plain.state_dict(), strict=False)
    assert missing == [] or set(missing) == set(feats.state_dict())
    return feats


def calls_of(model: torch.nn.Module, paths) -> dict[str, list]:
    calls: dict[str, list] = {p: [] for p in paths}
    for p in paths:
        model.get_submodule(p).register_forward_pre_hook(lambda m, i, p=p: calls[p].append(1))
    return calls


@pytest.mark.parametrize("name, expected", CASES, ids=[c[0] for c in CASES])
def test_timm_stages_are_features_only_maps_pooled_from_one_pass(name, expected):
    emb = stage_embedder(f"timm/{name}", weights="none", seed=0, input_size=SIZE)
    feats = timm_features(name)
    assert isinstance(emb, IntermediatesStageEmbedder)
    assert list(emb.stages) == expected == feats.feature_info.module_name()
    assert [emb.dims[s] for s in emb.stages] == feats.feature_info.channels()

    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    pools = [n for n, _ in emb.model.named_modules() if n.endswith("global_pool") or n == "conv_head"]
    assert pools, "a module after the last stage to watch"
    calls = calls_of(emb.model, [*expected, *pools])
    with torch.inference_mode():
        out = emb(x)
        want = [f.mean((2, 3)) for f in feats(x)]
    # one pass: every stage module ran once, and nothing after the deepest stage ran
    assert {p: len(c) for p, c in calls.items()} == {**{p: 1 for p in expected}, **{p: 0 for p in pools}}
    assert list(out) == expected
    for stage, ref in zip(expected, want):
        assert out[stage].shape == (2, emb.dims[stage]) == ref.shape
        torch.testing.assert_close(out[stage], ref, rtol=1e-5, atol=1e-6)


# ConvNeXt: its gap is timm's pooled pre-logits, LayerNorm-ed after the pool, not stages.3 pooled
@pytest.mark.parametrize("name, pick", [("resnet18", ["layer3", "layer1", "gap"]),
                                        ("convnext_atto", ["gap", "stages.2", "stages.0"])])
def test_two_stages_and_gap_from_one_pass(name, pick):
    emb = stage_embedder(f"timm/{name}", weights="none", seed=0, layers=pick, input_size=SIZE)
    stages = sorted(p for p in pick if p != "gap")
    assert emb.stages == (*stages, "gap")  # run order, gap last
    gap = load_backbone(f"timm/{name}", weights="none", seed=0)
    assert emb.dims["gap"] == gap.dim
    feats = timm_features(name)
    index = feats.feature_info.module_name()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    calls = calls_of(emb.model, index)
    with torch.inference_mode():
        out = emb(x)
        want = dict(zip(index, feats(x)))
        torch.testing.assert_close(out["gap"], gap(x), rtol=1e-5, atol=1e-6)  # the gap layer, exactly
    assert all(len(c) == 1 for c in calls.values()), "one pass"
    for s in stages:
        torch.testing.assert_close(out[s], want[s].mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_the_pass_stops_after_the_deepest_stage_asked_for():
    emb = stage_embedder("timm/convnext_atto", weights="none", layers="stages.1", input_size=SIZE)
    calls = calls_of(emb.model, ["stages.0", "stages.1", "stages.2", "stages.3"])
    with torch.inference_mode():
        out = emb(torch.zeros(1, 3, SIZE, SIZE))
    assert list(out) == ["stages.1"] and out["stages.1"].shape == (1, 80)
    assert {p: len(c) for p, c in calls.items()} == {"stages.0": 1, "stages.1": 1, "stages.2": 0, "stages.3": 0}


def test_without_forward_intermediates_the_feature_info_modules_are_hooked(monkeypatch):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    fast = stage_embedder("timm/resnet18", weights="none", layers=["layer2", "layer4", "gap"], input_size=SIZE)
    with torch.inference_mode():
        a = fast(x)
    monkeypatch.delattr(type(fast.model), "forward_intermediates")  # as in timm < 1.0
    hooked = stage_embedder("timm/resnet18", weights="none", layers=["layer2", "layer4", "gap"], input_size=SIZE)
    assert type(hooked) is StageEmbedder and hooked.stages == fast.stages and hooked.dims == fast.dims
    with torch.inference_mode():
        b = hooked(x)
    for s in fast.stages:
        torch.testing.assert_close(a[s], b[s], rtol=1e-5, atol=1e-6)


def test_unknown_timm_stage_lists_the_stages():
    with pytest.raises(UnknownLayerError, match=r"no stage 'stage\.1'\. Did you mean stages\.1.*"
                                                r"stages\.0, stages\.1, stages\.2, stages\.3; or gap"):
        stage_embedder("timm/convnext_atto", weights="none", layers=["stage.1"], input_size=SIZE)
    # any other module path of the model is still hooked like any network's
    emb = stage_embedder("timm/convnext_atto", weights="none", layers=["stem", "stages.1"], input_size=SIZE)
    assert emb.stages == ("stem", "stages.1") and emb.dims == {"stem": 40, "stages.1": 80}


def test_cli_extracts_every_timm_stage(image_folder, tmp_path):
    out = tmp_path / "emb"
    r = CliRunner().invoke(main, ["-q", "extract", str(image_folder), "--backbone", "timm/resnet18",
                                  "--weights", "none", "--layer", "stages", "--out", str(out), "--workers", "1",
                                  "--resize-size", "72", "--crop-size", "64"])
    assert r.exit_code == 0, r.output
    stages = ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert [p.name for p in stage_datasets(out)] == stages
    # the reference: timm's features on timm's own normalisation, resized and cropped by torchvision
    feats = timm_features("resnet18")
    cfg = timm.data.resolve_data_config({}, model=feats)
    transform = transforms.Compose([
        transforms.Resize(72, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(64),
        transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"]),
    ])
    first = read_embeddings(out / "act1")
    with torch.inference_mode():
        maps = [feats(transform(Image.open(image_folder / i).convert("RGB"))[None]) for i in first.ids]
    for k, (s, dim) in enumerate(zip(stages, (64, 64, 128, 256, 512))):
        e = read_embeddings(out / s)
        assert list(e.ids) == list(first.ids)
        assert (e.meta["layer"], e.meta["dim"], e.meta["backbone"]) == (s, dim, "timm/resnet18")
        assert e.meta["depth"] == round((k + 1) / len(stages), 4)
        want = torch.cat([m[k].mean((2, 3)) for m in maps]).numpy()
        np.testing.assert_allclose(e.vectors, want, rtol=1e-4, atol=1e-4)
    # a query image embedded from one stage's metadata alone gives the stored vector
    vectors, _ = embed_paths([image_folder / i for i in first.ids[:2]], read_embeddings(out / "layer2").meta)
    np.testing.assert_allclose(vectors, read_embeddings(out / "layer2").vectors[:2], rtol=1e-4, atol=1e-5)
