"""Extraction end to end: folder -> Parquet, against torchvision's own per-image pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image
from torchvision.models import get_model, get_model_weights

from embedpipe.config import DecodeMode, ExtractConfig, Layer
from embedpipe.errors import TooManyErrorsError
from embedpipe.extraction import extract
from embedpipe.extraction.forward import embed_paths
from embedpipe.store import list_parts, read_embeddings, read_errors


def reference_embeddings(paths: list[Path], name: str = "resnet18", seed: int = 0) -> np.ndarray:
    """The naive per-image loop: PIL open -> weights' transforms -> torchvision model,
    with the global-average-pooled features captured at the input of ``fc``."""
    torch.manual_seed(seed)
    model = get_model(name, weights=None).eval()
    transform = get_model_weights(name).DEFAULT.transforms()
    seen = []
    model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.inference_mode():
        for p in paths:
            model(transform(Image.open(p).convert("RGB"))[None])
    return torch.cat(seen).numpy()


def config(source: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(source=source, out=out, **{"backbone": "resnet18", "weights": "none",
                                                     "batch_size": 4, "workers": 1, **kw})


def test_folder_to_parquet_matches_torchvision(image_folder, tmp_path):
    out = tmp_path / "emb"
    summary = extract(config(image_folder, out, decode=DecodeMode.FULL))
    assert (summary.images, summary.embedded, summary.errors) == (10, 10, 0)
    e = read_embeddings(out)
    files = sorted(image_folder.rglob("*.*"))
    assert e.ids.tolist() == [p.relative_to(image_folder).as_posix() for p in files]
    assert e.labels.tolist() == [p.parent.name for p in files]
    np.testing.assert_allclose(e.vectors, reference_embeddings(files), rtol=1e-4, atol=1e-5)
    meta = e.meta
    assert meta["backbone"] == "resnet18" and meta["layer"] == "gap" and meta["dim"] == 512
    assert meta["weights"] == {"kind": "none", "name": "none", "pretrained": False, "sha256": None,
                               "url": None, "seed": 0}
    assert meta["preprocessing"]["resize_size"] == 256 and meta["precision"] == "fp32"
    assert {"torch", "torchvision", "pillow", "embedpipe"} <= set(meta["versions"])


def test_full_decoding_is_the_default_and_draft_is_opt_in(tmp_path):
    """The default is the exact path; draft is recorded when asked for. How close draft
    stays is measured on pixels (tests/test_decode.py) and with real weights (docs)."""
    src = tmp_path / "big"
    for i, size in enumerate([(1600, 1200), (1024, 768), (900, 1400)]):
        make_image(src / f"{i}.jpg", size=size, seed=i, quality=90)
    default = read_embeddings(extract(config(src, tmp_path / "default")).out)
    full = read_embeddings(extract(config(src, tmp_path / "full", decode=DecodeMode.FULL)).out)
    draft = read_embeddings(extract(config(src, tmp_path / "draft", decode=DecodeMode.DRAFT)).out)
    assert default.meta["decode"] == "full" and draft.meta["decode"] == "draft"
    np.testing.assert_array_equal(default.vectors, full.vectors)
    assert not np.array_equal(full.vectors, draft.vectors)  # draft really decoded at a reduced scale


def test_rerun_embeds_only_what_changed(image_folder, tmp_path):
    out = tmp_path / "emb"
    cfg = config(image_folder, out, decode=DecodeMode.FULL)
    extract(cfg)
    again = extract(cfg)
    assert (again.embedded, again.skipped, again.dropped) == (0, 10, 0)

    make_image(image_folder / "cats" / "new.png", seed=99)
    changed = make_image(image_folder / "dogs" / "001.png", size=(50, 70), seed=123)
    os.utime(changed, ns=(1, 1))  # a different mtime for certain, whatever the clock
    (image_folder / "cats" / "002.jpg").unlink()
    third = extract(cfg)
    assert (third.embedded, third.dropped, third.skipped) == (2, 2, 8)

    e = read_embeddings(out)
    files = sorted(image_folder.rglob("*.*"))
    assert sorted(e.ids.tolist()) == [p.relative_to(image_folder).as_posix() for p in files]
    order = np.argsort(e.ids)
    np.testing.assert_allclose(e.vectors[order], reference_embeddings(files), rtol=1e-4, atol=1e-5)


def test_bad_files_become_error_records_and_the_job_goes_on(image_folder, tmp_path):
    (image_folder / "cats" / "empty.jpg").write_bytes(b"")
    (image_folder / "dogs" / "noise.jpg").write_bytes(os.urandom(500))
    summary = extract(config(image_folder, tmp_path / "emb"))
    assert (summary.embedded, summary.errors) == (10, 2)
    assert summary.errors_by_type == {"empty_file": 1, "not_an_image": 1}
    errors = read_errors(tmp_path / "emb").sort_values("id")
    assert errors[["id", "error_type"]].values.tolist() == [
        ["cats/empty.jpg", "empty_file"], ["dogs/noise.jpg", "not_an_image"]]
    # unchanged bad files are not retried; a fixed one is, and its error record goes
    assert extract(config(image_folder, tmp_path / "emb")).skipped == 12
    make_image(image_folder / "cats" / "empty.jpg", fmt="JPEG")
    fixed = extract(config(image_folder, tmp_path / "emb"))
    assert (fixed.embedded, fixed.errors) == (1, 0)
    assert read_errors(tmp_path / "emb")["id"].tolist() == ["dogs/noise.jpg"]


def test_max_errors_stops_the_job_and_keeps_the_work(image_folder, tmp_path):
    for i in range(4):
        (image_folder / "cats" / f"zz{i}.jpg").write_bytes(b"junk")
    with pytest.raises(TooManyErrorsError, match="more than --max-errors 2"):
        extract(config(image_folder, tmp_path / "emb", max_errors=2))
    assert list_parts(tmp_path / "emb")  # what was embedded before stopping is committed
    # as a fraction of the images to embed: 4 of 14 bad is under a half
    assert extract(config(image_folder, tmp_path / "emb2", max_errors=0.5)).errors == 4


def _captured(model: torch.nn.Module, module: torch.nn.Module, batches) -> np.ndarray:
    """The input of ``module`` while ``model`` runs on each batch (a forward pre-hook)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(torch.flatten(args[0], 1)))
    with torch.inference_mode():
        for x in batches:
            model(x)
    handle.remove()
    return torch.cat(seen).numpy()


def test_penultimate_layer_and_float16_storage(image_folder, tmp_path):
    """AlexNet's fc7 (the input of classifier.6), stored as float16: torchvision's own
    module output, rounded once."""
    summary = extract(config(image_folder, tmp_path / "emb", backbone="alexnet",
                             layer=Layer.PENULTIMATE, embedding_dtype="float16"))
    e = read_embeddings(summary.out)
    assert e.vectors.shape == (10, 4096) and e.meta["embedding_dtype"] == "float16"
    torch.manual_seed(0)
    model = get_model("alexnet", weights=None).eval()
    transform = get_model_weights("alexnet").DEFAULT.transforms()
    files = [image_folder / i for i in e.ids]
    fc7 = _captured(model, model.classifier[6], (transform(Image.open(p).convert("RGB"))[None] for p in files))
    np.testing.assert_allclose(e.vectors, fc7.astype(np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
    assert np.array_equal(e.vectors, e.vectors.astype(np.float16).astype(np.float32))  # really float16


def test_normalize_option(image_folder, tmp_path):
    e = read_embeddings(extract(config(image_folder, tmp_path / "emb", normalize=True)).out)
    np.testing.assert_allclose(np.linalg.norm(e.vectors, axis=1), 1.0, rtol=1e-3)
    assert e.meta["normalize"] is True


def test_grayscale_backbone_on_colour_images(image_folder, tmp_path):
    """LeNet-5 on colour files: PIL's luma conversion, torchvision's resize and crop, the
    MNIST statistics, then C5 (the input of the classifier)."""
    import torchvision.transforms.v2 as T

    from embedpipe.backbones.lenet import lenet5

    e = read_embeddings(extract(config(image_folder, tmp_path / "emb", backbone="lenet5")).out)
    assert e.vectors.shape == (10, 120) and e.meta["preprocessing"]["channels"] == 1
    torch.manual_seed(0)
    model = lenet5().eval()
    transform = T.Compose([T.PILToTensor(), T.Resize(32, antialias=True), T.CenterCrop(32),
                           T.ToDtype(torch.float32, scale=True), T.Normalize((0.1307,), (0.3081,))])
    files = [image_folder / i for i in e.ids]
    c5 = _captured(model, model.classifier, (transform(Image.open(p).convert("L"))[None] for p in files))
    np.testing.assert_allclose(e.vectors, c5, rtol=1e-4, atol=2e-3)


def test_embed_paths_reproduces_the_dataset(image_folder, tmp_path):
    e = read_embeddings(extract(config(image_folder, tmp_path / "emb")).out)
    paths = [image_folder / i for i in e.ids[:3]] + [tmp_path / "missing.jpg"]
    vectors, failures = embed_paths(paths, e.meta)
    np.testing.assert_allclose(vectors[:3], e.vectors[:3], rtol=1e-5, atol=1e-6)
    assert failures[:3] == [None] * 3 and failures[3].error_type == "not_found"
    assert np.isnan(vectors[3]).all()


def test_queries_are_refused_when_the_recorded_weights_changed(image_folder, tmp_path):
    """A checkpoint replaced at the same path would embed queries in another space."""
    import torch

    from embedpipe.backbones.lenet import lenet5
    from embedpipe.errors import MetadataMismatchError

    ckpt = tmp_path / "lenet.pt"
    torch.manual_seed(1)
    torch.save(lenet5().state_dict(), ckpt)
    e = read_embeddings(extract(config(image_folder, tmp_path / "emb", backbone="lenet5", weights=str(ckpt))).out)
    paths = [image_folder / i for i in e.ids[:2]]
    np.testing.assert_allclose(embed_paths(paths, e.meta)[0], e.vectors[:2], rtol=1e-5, atol=1e-6)
    torch.manual_seed(2)
    torch.save(lenet5().state_dict(), ckpt)  # same path, other weights
    with pytest.raises(MetadataMismatchError, match=r"weights: .*sha256.*\(the embeddings\) != .*\(loaded now\)"):
        embed_paths(paths, e.meta)
    # another layer recorded than the backbone loads (a damaged or edited record)
    with pytest.raises(MetadataMismatchError, match="dim: 84 .* != 120"):
        embed_paths(paths, {**e.meta, "dim": 84})


def test_a_label_fixed_in_the_manifest_reaches_the_dataset_without_re_embedding(image_folder, tmp_path):
    import pandas as pd

    paths = sorted(str(p.relative_to(tmp_path)) for p in image_folder.rglob("*.*"))
    labels = [Path(p).parent.name for p in paths]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": paths, "label": labels}).to_csv(manifest, index=False)
    cfg = config(manifest, tmp_path / "emb", part_rows=4)
    extract(cfg)
    before = read_embeddings(cfg.out)
    fixed = {paths[0]: "dogs", paths[-1]: None}
    pd.DataFrame({"path": paths, "label": [fixed.get(p, lbl) for p, lbl in zip(paths, labels)]}).to_csv(
        manifest, index=False
    )
    again = extract(cfg)
    assert (again.embedded, again.relabelled, again.dropped) == (0, 2, 0)
    assert "2 relabelled" in again.line()
    after = read_embeddings(cfg.out)
    order = np.argsort(after.ids)
    assert dict(zip(after.ids, after.labels)) == {
        p: fixed.get(p, lbl) for p, lbl in zip(paths, labels)
    }
    np.testing.assert_array_equal(after.vectors[order], before.vectors[np.argsort(before.ids)])
    assert extract(cfg).relabelled == 0  # and now it is current


def test_the_bad_input_corpus_end_to_end(tmp_path):
    """A folder of every awkward case: readable ones embedded, the rest recorded by type."""
    from PIL import Image

    root = tmp_path / "corpus" / "c"
    make_image(root / "ok.jpg")
    make_image(root / "png named.jpg", fmt="PNG")
    make_image(root / "cmyk.jpg", mode="CMYK")
    make_image(root / "gray.png", mode="L")
    make_image(root / "one bit.png", mode="1")
    make_image(root / "palette.png", mode="P", transparency=0)
    make_image(root / "rgba.png", mode="RGBA")
    make_image(root / "anim.gif", mode="P", save_all=True,
               append_images=[Image.new("P", (64, 48), 3)])
    make_image(root / "tiny.png", size=(1, 1))
    make_image(root / "ünïcødé ✓.webp")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(root / "deep16.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "noise.jpg").write_bytes(os.urandom(300))
    trunc = make_image(root / "truncated.jpg", size=(300, 300), quality=95)
    trunc.write_bytes(trunc.read_bytes()[:1500])
    make_image(root / "huge.png", size=(400, 300))
    os.symlink(root / "nowhere.jpg", root / "broken link.jpg")
    os.symlink(root / "loop.jpg", root / "loop.jpg")
    (root / "folder.jpg").mkdir()
    summary = extract(config(root.parent, tmp_path / "emb", max_pixels=100_000))
    assert summary.embedded == 11
    assert summary.errors_by_type == {"empty_file": 1, "not_an_image": 1, "truncated": 1,
                                      "too_many_pixels": 1, "not_found": 1, "unreadable": 1}
    e = read_embeddings(tmp_path / "emb")
    assert "c/ünïcødé ✓.webp" in set(e.ids) and np.isfinite(e.vectors).all()


def test_device_decode_path_on_the_cpu(tmp_path):
    """--decode device: JPEGs decoded in batches by torchvision.io.decode_jpeg (nvJPEG on a
    GPU, libjpeg-turbo here), other formats by the workers; close to the worker path."""
    src = tmp_path / "src" / "x"
    for i, size in enumerate([(1200, 900), (640, 480), (300, 500)]):
        make_image(src / f"{i}.jpg", size=size, seed=i, quality=92)
    make_image(src / "p.png", size=(200, 150))
    trunc = make_image(src / "t.jpg", size=(300, 300), quality=95)
    trunc.write_bytes(trunc.read_bytes()[: len(trunc.read_bytes()) // 2])
    dev = extract(config(src.parent, tmp_path / "dev", decode=DecodeMode.DEVICE))
    full = extract(config(src.parent, tmp_path / "full", decode=DecodeMode.FULL))
    assert (dev.embedded, dev.errors_by_type) == (4, {"truncated": 1})
    assert full.errors_by_type == {"truncated": 1}
    a, b = read_embeddings(dev.out), read_embeddings(full.out)
    assert a.ids.tolist() == b.ids.tolist()  # how close the pixels are: tests/test_decode.py
    png = a.ids.tolist().index("x/p.png")
    np.testing.assert_allclose(a.vectors[png], b.vectors[png], rtol=1e-5, atol=1e-6)  # worker-decoded
    assert a.meta["decode"] == "device"


def test_a_folder_uri_extracts_and_resumes_like_the_folder(image_folder, tmp_path):
    options = dict(backbone="userbackbone:build", weights="none", workers=1)
    extract(ExtractConfig(source=image_folder, out=tmp_path / "local", **options))
    uri = image_folder.as_uri()
    first = extract(ExtractConfig(source=uri, out=tmp_path / "uri", **options))
    a, b = read_embeddings(tmp_path / "local"), read_embeddings(tmp_path / "uri")
    assert list(b.ids) == list(a.ids) and first.embedded == 10
    np.testing.assert_array_equal(b.vectors, a.vectors)
    assert b.meta["images"] == uri
    changed = image_folder / "dogs" / "002.jpg"
    make_image(changed, size=(50, 50), seed=77)
    os.utime(changed, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    again = extract(ExtractConfig(source=uri, out=tmp_path / "uri", **options))
    assert (again.embedded, again.skipped, again.dropped) == (1, 9, 1)


def test_out_of_device_memory_halves_the_batch_and_loses_nothing(monkeypatch):
    """What a GPU does at too large a batch, forced on the CPU: the forward raises
    torch.cuda.OutOfMemoryError above 3 images; every image is still embedded, exactly."""
    from embedpipe.backbones import load_backbone
    from embedpipe.extraction.forward import BatchEmbedder
    from embedpipe.extraction.plan import plan

    runtime = plan(ExtractConfig(source=".", out=".", backbone="lenet5", device="cpu", batch_size=8))
    forward = BatchEmbedder(load_backbone("lenet5", weights="none"), runtime)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
    expected = np.concatenate([forward(pixels[i : i + 1]) for i in range(8)])
    real, refused = forward._forward, []

    def small_memory(x):
        if len(x) > 3:
            refused.append(len(x))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(forward, "_forward", small_memory)
    np.testing.assert_allclose(forward(pixels), expected, rtol=1e-5, atol=1e-6)
    assert refused == [8, 4] and forward.max_batch == 2
    np.testing.assert_allclose(forward(pixels), expected, rtol=1e-5, atol=1e-6)
    assert refused == [8, 4]  # later batches run at the size that fitted
