"""embedpipe probe / report from the command line, against scikit-learn on the same arrays."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from embedpipe.cli import main
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
from embedpipe.probe.linear import split_by_id
from embedpipe.store import read_embeddings


def test_probe_two_backbones_then_rerender(image_folder, tmp_path):
    for backbone in ("lenet5", "resnet18"):
        extract(ExtractConfig(source=image_folder, out=tmp_path / backbone, backbone=backbone,
                              weights="none", workers=1, resize_size=40, crop_size=32))
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["-q", "probe", str(tmp_path / "lenet5"), str(tmp_path / "resnet18"),
                                  "--out", str(out), "--test-size", "0.4", "--jobs", "1"])
    assert r.exit_code == 0, r.output
    assert "lenet5: linear top-1" in r.output and "report:" in r.output
    doc = json.loads((out / "results.json").read_text())
    m = doc["datasets"]["resnet18"]["metrics"]
    # the same split and C, fitted by scikit-learn directly, gives the same accuracy
    e = read_embeddings(tmp_path / "resnet18")
    classes = sorted(set(e.labels))
    y = np.array([classes.index(v) for v in e.labels])
    train, test = split_by_id(e.ids, y, fraction=0.4, seed=0)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=m["linear.C"], max_iter=1000)).fit(e.vectors[train], y[train])
    assert abs(ref.score(e.vectors[test], y[test]) - m["linear.top1"]) < 1e-9
    (out / "report.html").unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and (out / "report.html").stat().st_size > 10_000


def test_probe_refuses_unlabelled_embeddings(tmp_path):
    from conftest import make_image

    for i in range(4):
        make_image(tmp_path / "flat" / f"{i}.png", seed=i)  # images at the root: no labels
    extract(ExtractConfig(source=tmp_path / "flat", out=tmp_path / "emb", backbone="lenet5", weights="none", workers=1))
    r = CliRunner().invoke(main, ["probe", str(tmp_path / "emb"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "label" in r.output
