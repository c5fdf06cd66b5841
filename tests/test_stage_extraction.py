"""extract --layer stages: a dataset per stage from one forward pass, exact, resumable."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.models import get_model, get_model_weights

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.extraction.forward import embed_paths
from embedpipe.extraction.layers import stage_datasets
from embedpipe.store import DatasetWriter, read_embeddings

STAGES = ["layer1", "layer2", "layer3", "layer4"]


def config(src, out, **kw):
    return ExtractConfig(source=src, out=out, backbone="resnet18", weights="none", stages=("stages",),
                         batch_size=4, workers=1, resize_size=72, crop_size=64, **kw)


def test_each_stage_is_torchvisions_module_output_pooled(image_folder, tmp_path):
    summary = extract(config(image_folder, tmp_path / "emb"))
    assert summary.embedded == 10
    assert [p.name for p in stage_datasets(tmp_path / "emb")] == STAGES
    torch.manual_seed(0)
    model = get_model("resnet18", weights=None).eval()
    transform = get_model_weights("resnet18").DEFAULT.transforms(resize_size=72, crop_size=64)
    seen: dict[str, list] = {s: [] for s in STAGES}
    for s in STAGES:
        model.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: seen[s].append(o.mean((2, 3))))
    first = read_embeddings(tmp_path / "emb" / "layer1")
    with torch.inference_mode():
        for i in first.ids:
            model(transform(Image.open(image_folder / i).convert("RGB"))[None])
    for s, dim in zip(STAGES, (64, 128, 256, 512)):
        e = read_embeddings(tmp_path / "emb" / s)
        assert list(e.ids) == list(first.ids) and e.meta["layer"] == s and e.meta["dim"] == dim
        np.testing.assert_allclose(e.vectors, torch.cat(seen[s]).numpy(), rtol=1e-4, atol=1e-4)


def test_a_stage_left_behind_by_a_crash_is_embedded_again_everywhere(image_folder, tmp_path):
    extract(config(image_folder, tmp_path / "emb"))
    e = read_embeddings(tmp_path / "emb" / "layer3")
    # as if killed between two stages' commits: layer3 lacks two rows the others hold
    with DatasetWriter(tmp_path / "emb" / "layer3", e.meta) as w:
        w.drop(set(e.ids[:2]))
    again = extract(config(image_folder, tmp_path / "emb"))
    assert again.embedded == 2
    ids = [sorted(read_embeddings(p).ids) for p in stage_datasets(tmp_path / "emb")]
    assert all(i == ids[0] for i in ids) and len(ids[0]) == 10
    assert extract(config(image_folder, tmp_path / "emb")).embedded == 0


def test_cli_layer_list_and_query_embedding_of_a_stage(image_folder, tmp_path):
    r = CliRunner().invoke(main, ["-q", "extract", str(image_folder), "--backbone", "resnet18", "--weights", "none",
                                  "--layer", "layer2,layer3", "--out", str(tmp_path / "emb"), "--workers", "1",
                                  "--resize-size", "72", "--crop-size", "64"])
    assert r.exit_code == 0, r.output
    e = read_embeddings(tmp_path / "emb" / "layer2")
    assert e.vectors.shape == (10, 128)
    vectors, failures = embed_paths([image_folder / i for i in e.ids[:3]], e.meta)
    np.testing.assert_allclose(vectors, e.vectors[:3], rtol=1e-4, atol=1e-5)
