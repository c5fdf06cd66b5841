"""Fine-tuning: loss falls, frozen really is frozen, aux heads train, runs resume, and the
checkpoint feeds extract."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from embedpipe.backbones import load_backbone
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.finetune import FinetuneConfig, build_network, finetune
from embedpipe.images.samples import mnist_folder
from embedpipe.probe import stratified_split
from embedpipe.store import read_embeddings


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> Path:
    """Three classes told apart by where the bright half of a noisy image lies."""
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["left", "right", "top"]):
        (root / name).mkdir()
        for i in range(24):
            a = rng.integers(0, 90, (40, 40, 3)).astype(np.uint8)
            region = [np.s_[:, :20], np.s_[:, 20:], np.s_[:20]][c]
            a[region] += 140
            Image.fromarray(a).save(root / name / f"{i:02d}.png")
    return root


def cfg(source: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(backbone="lenet5", weights="none", mode="full", epochs=3, batch_size=16, lr=0.05,
                augment="none", resize_size=36, crop_size=32)
    return FinetuneConfig(source=source, out=out, **{**base, **kw})


def history(out: Path) -> list[dict]:
    with open(out / "history.csv") as f:
        return list(csv.DictReader(f))


def test_lenet_from_scratch_loss_decreases(stripes, tmp_path):
    result = finetune(cfg(stripes, tmp_path / "run", epochs=5))
    h = history(tmp_path / "run")
    assert len(h) == 5 and float(h[-1]["train_loss"]) < 0.8 * float(h[0]["train_loss"])
    assert result.test_accuracy > 0.9 and result.classes == ["left", "right", "top"]
    assert (tmp_path / "run" / "history.png").stat().st_size > 1000


def test_partial_freezes_what_it_should(stripes, tmp_path):
    config = cfg(stripes, tmp_path / "run", backbone="resnet18", mode="partial", epochs=1)
    before, _, _, _ = build_network(config, 3)
    before = {k: v.clone() for k, v in before.state_dict().items()}
    finetune(config)
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])  # frozen BN
    assert torch.equal(before["layer3.1.conv2.weight"], after["layer3.1.conv2.weight"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_head_mode_matches_a_linear_probe_on_the_same_features(tmp_path):
    """Head mode on cached frozen features vs scikit-learn's logistic regression on the
    embeddings of the same images, with the same (probe) split."""
    digits = mnist_folder(tmp_path / "digits", per_class=24, digits=range(5))
    out = tmp_path / "head"
    result = finetune(cfg(digits, out, backbone="resnet18", mode="head", epochs=30, lr=0.05, batch_size=32,
                          resize_size=32, crop_size=32, weight_decay=0.0))
    e = read_embeddings(extract(ExtractConfig(source=digits, out=tmp_path / "emb", backbone="resnet18",
                                              weights="none", resize_size=32, crop_size=32, workers=1)).out)
    classes = sorted(set(e.labels))
    y = np.array([classes.index(v) for v in e.labels])
    train, test = stratified_split(y, fraction=0.2, seed=0)
    lr = LogisticRegression(C=1.0, max_iter=5000).fit(e.vectors[train], y[train])
    probe_acc = lr.score(e.vectors[test], y[test])
    assert abs(result.test_accuracy - probe_acc) <= 0.12, (result.test_accuracy, probe_acc)
    assert result.test_accuracy > 0.5  # well above chance (0.2): the head did learn


def test_googlenet_trains_its_aux_heads_and_extraction_drops_them(stripes, tmp_path):
    config = cfg(stripes, tmp_path / "g", backbone="googlenet", mode="partial", epochs=1, resize_size=64, crop_size=64)
    calls = {"aux1": 0}
    import embedpipe.finetune as ft

    real = ft.build_network

    def spying(*a, **k):
        model, heads, p, w = real(*a, **k)
        model.aux1.register_forward_hook(lambda *_: calls.__setitem__("aux1", calls["aux1"] + 1))
        return model, heads, p, w

    ft.build_network = spying
    try:
        finetune(config)
    finally:
        ft.build_network = real
    assert calls["aux1"] > 0  # the auxiliary loss was computed during training
    state = torch.load(tmp_path / "g" / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("aux1.") for k in state["state_dict"])
    emb = load_backbone("googlenet", weights=str(tmp_path / "g" / "checkpoint.pt"))
    assert emb.model.aux1 is None and emb.model.aux2 is None


def test_checkpoint_round_trips_through_extract(stripes, tmp_path):
    finetune(cfg(stripes, tmp_path / "run", epochs=2))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    e = read_embeddings(extract(ExtractConfig(source=stripes, out=tmp_path / "emb", backbone="lenet5",
                                              weights=str(ckpt), resize_size=36, crop_size=32, workers=1)).out)
    from embedpipe.backbones import load_classifier

    model, _, _ = load_classifier("lenet5", weights="none")
    model.classifier[2] = torch.nn.Linear(84, 3)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    feats = []
    model.classifier.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    from embedpipe.config import DecodeMode
    from embedpipe.extraction.forward import pixels_to_tensor
    from embedpipe.images.decode import decode_file

    p = load_backbone("lenet5", weights="none").preprocessing.__class__(
        resize_size=36, crop_size=32, mean=(0.1307,), std=(0.3081,), channels=1)
    d = decode_file(str(stripes / e.ids[0]), p, max_pixels=10**8, mode=DecodeMode.DRAFT)
    with torch.inference_mode():
        model.eval()(pixels_to_tensor(d.pixels[None], p))
    np.testing.assert_allclose(e.vectors[0], feats[0][0].numpy(), rtol=1e-5, atol=1e-6)
    assert e.meta["weights"]["kind"] == "checkpoint"


@pytest.mark.slow
def test_a_killed_run_resumes(stripes, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "embedpipe", "-q", "finetune", str(stripes), "--backbone", "resnet18",
           "--weights", "none", "--mode", "partial", "--out", str(out), "--epochs", "5", "--batch-size", "8",
           "--augment", "none", "--resize-size", "36", "--crop-size", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "history.csv").exists() and len(history(out)) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    before = history(out)
    assert 2 <= len(before) < 5, "the run was not killed mid-way"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    after = history(out)
    assert [int(r["epoch"]) for r in after] == [1, 2, 3, 4, 5]
    assert after[: len(before)] == before  # finished epochs were not redone
