"""Fine-tuning: loss falls, frozen really is frozen, aux heads train, runs resume (to the
bit), the test images are the probe's, and the checkpoint feeds extract."""

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
from embedpipe.config import ExtractConfig, FinetuneConfig
from embedpipe.errors import FinetuneError
from embedpipe.extraction import extract
from embedpipe.finetune import build_network, finetune, split_rows
from embedpipe.images.samples import mnist_folder
from embedpipe.images.sources import open_source
from embedpipe.probe import ProbeConfig, ProbeInput, run_probe
from embedpipe.probe.linear import split_by_id
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
    # 8 epochs: at 5, one shuffling order in 6 had not yet told all three classes apart
    result = finetune(cfg(stripes, tmp_path / "run", epochs=8))
    h = history(tmp_path / "run")
    assert len(h) == 8 and float(h[-1]["train_loss"]) < 0.8 * float(h[0]["train_loss"])
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


@pytest.mark.slow
def test_head_mode_matches_a_linear_probe_on_the_same_features(tmp_path):
    """Head mode on cached frozen features vs scikit-learn's logistic regression on the
    embeddings of the same images, with the same (probe) split. 48 images a class: with
    24, 10 validation images choose the best epoch, and test accuracy swung between 0.79
    and 0.92 with the shuffling order alone."""
    digits = mnist_folder(tmp_path / "digits", per_class=48, digits=range(5))
    out = tmp_path / "head"
    result = finetune(cfg(digits, out, backbone="resnet18", mode="head", epochs=30, lr=0.05, batch_size=32,
                          resize_size=32, crop_size=32, weight_decay=0.0))
    e = read_embeddings(extract(ExtractConfig(source=digits, out=tmp_path / "emb", backbone="resnet18",
                                              weights="none", resize_size=32, crop_size=32, workers=1)).out)
    classes = sorted(set(e.labels))
    y = np.array([classes.index(v) for v in e.labels])
    train, test = split_by_id(e.ids, y, fraction=0.2, seed=0)
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
    # trained from random init without transform_input: the checkpoint says so, extract honours it
    assert state["embedpipe_finetune"]["build"] == {"transform_input": False}
    assert emb.model.transform_input is False


def test_the_loss_adds_each_auxiliary_head_with_its_weight():
    """GoogLeNet's training loss: CE(main) + 0.3 CE(aux1) + 0.3 CE(aux2) (Szegedy et al.)."""
    from torchvision.models.googlenet import GoogLeNetOutputs

    from embedpipe.backbones import get_family
    from embedpipe.finetune import _loss

    torch.manual_seed(0)
    main, aux2, aux1 = torch.randn(3, 6, 5).unbind(0)
    y = torch.randint(0, 5, (6,))
    ce = torch.nn.CrossEntropyLoss()
    total, logits = _loss(GoogLeNetOutputs(main, aux2, aux1), y, ce, get_family("googlenet").aux_heads)
    torch.testing.assert_close(total, ce(main, y) + 0.3 * ce(aux1, y) + 0.3 * ce(aux2, y))
    assert logits is main


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


def test_finetune_tests_on_the_images_the_probe_tests_on(stripes, tmp_path):
    """The same folder, seed and test size hold out the same images in ``embedpipe probe``
    (on embeddings, whatever order their rows are stored in) and in fine-tuning (whatever
    order the records come in). Compares the ids each path picks, without training."""
    e = read_embeddings(extract(ExtractConfig(source=stripes, out=tmp_path / "emb", backbone="lenet5",
                                              weights="none", resize_size=36, crop_size=32, workers=1)).out)
    order = np.random.default_rng(0).permutation(len(e.ids))  # as after an incremental rerun
    stored = ProbeInput("lenet5", e.ids[order], e.labels[order], e.vectors[order], e.meta)
    probe = run_probe([stored], ProbeConfig(test_size=0.3, seed=5, Cs=(1.0,), knn_ks=(10,)))

    records = open_source(stripes)
    classes = sorted({r.label for r in records})
    config = cfg(stripes, tmp_path / "run", test_size=0.3, seed=5)
    for listed in (records, records[::-1]):
        ids = np.array([r.id for r in listed], dtype=object)
        parts = split_rows(ids, np.array([classes.index(r.label) for r in listed]), config)
        assert sorted(ids[parts["test"]]) == sorted(probe.split.test_ids)
        assert len(np.intersect1d(parts["test"], np.r_[parts["train"], parts["val"]])) == 0


class Killed(Exception):
    """Stands for a kill between two epochs."""


def run_killed(config: FinetuneConfig, after_epoch: int, monkeypatch) -> None:
    """Run ``config`` until epoch ``after_epoch`` is saved, then stop it as a kill would."""
    import embedpipe.finetune as ft

    write = ft._write_history  # the last thing an epoch does, after saving last.pt

    def write_then_die(out, rows):
        write(out, rows)
        if len(rows) == after_epoch:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(ft, "_write_history", write_then_die)
        with pytest.raises(Killed):
            finetune(config)
    assert len(history(config.out)) == after_epoch


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(stripes, tmp_path, monkeypatch):
    """Shuffling, augmentation, optimizer and gradient scaler carry over exactly: resumed
    after epoch 2 of 4, the run's final and best weights and its scaler equal an
    uninterrupted run's, bit for bit."""
    # on a CPU finetune's scaler is off: turn one on, its scale growing every 3 steps
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled: scaler("cpu", init_scale=2.0**10, growth_interval=3))
    settings = {"epochs": 4, "batch_size": 8, "augment": "standard"}
    caller = torch.get_rng_state()
    finetune(cfg(stripes, tmp_path / "whole", **settings))
    assert torch.equal(torch.get_rng_state(), caller)  # per-epoch seeding left it alone
    resumed = cfg(stripes, tmp_path / "resumed", **settings)
    run_killed(resumed, 2, monkeypatch)
    finetune(resumed)
    for file, key in (("last.pt", "model"), ("checkpoint.pt", "state_dict")):
        a, b = (torch.load(tmp_path / run / file, weights_only=True)[key] for run in ("whole", "resumed"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), file
    scalers = [torch.load(tmp_path / run / "last.pt", weights_only=True)["scaler"] for run in ("whole", "resumed")]
    assert scalers[0] == scalers[1] and scalers[0]["scale"] > 2.0**10
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in history(tmp_path / run)]
               for run in ("whole", "resumed")]
    assert untimed[0] == untimed[1]


@pytest.mark.parametrize("after_epoch", [2, 3])
def test_early_stopping_counts_across_a_resume(stripes, tmp_path, monkeypatch, after_epoch):
    """At lr 0 validation never improves after epoch 1, so patience 2 stops after epoch 3;
    killed after epoch 2 (one stale epoch) or 3 (stopped), the resumed run stops there too."""
    config = cfg(stripes, tmp_path / "run", epochs=6, lr=0.0, early_stopping=2)
    run_killed(config, after_epoch, monkeypatch)
    result = finetune(config)
    assert result.epochs_run == 3 and result.best_epoch == 1
    assert [int(r["epoch"]) for r in history(config.out)] == [1, 2, 3]


def test_a_last_pt_of_the_older_layout_is_refused(stripes, tmp_path):
    """Without its scaler and early-stopping state an older run cannot resume exactly."""
    config = cfg(stripes, tmp_path / "run")
    config.out.mkdir()
    torch.save({"model": {}, "epoch": 0, "rng": torch.get_rng_state()}, config.out / "last.pt")
    with pytest.raises(FinetuneError, match="older embedpipe"):
        finetune(config)
