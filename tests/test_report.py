"""The report files: results.json names, self-contained HTML, re-rendering from JSON alone."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from embedpipe.errors import ReportError
from embedpipe.probe import ProbeConfig, ProbeInput, run_probe
from embedpipe.report import (
    FIGURES_DIR,
    HTML_FILE,
    MARKDOWN_FILE,
    RESULTS_FILE,
    load_results,
    render_report,
    write_report,
)

FIGURES = ("accuracy", "validation_curve", "confusion_matrix", "projection")


@pytest.fixture(scope="module")
def results():
    """Digits as two 'backbones': pixels (recorded as pretrained) and a random projection."""
    X, y = load_digits(return_X_y=True)
    X, y = X[:600].astype(np.float32), y[:600]
    ids = np.array([f"digit{i:04d}.png" for i in range(len(y))], dtype=object)
    projection = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)

    def meta(backbone, weights, pretrained, dim):
        return {
            "backbone": backbone,
            "layer": "gap",
            "dim": dim,
            "weights": {"name": weights, "pretrained": pretrained},
            "preprocessing": {"resize_size": 8},
        }

    inputs = [
        ProbeInput("pixels", ids, y.astype(object), X, meta("pixels", "IMAGENET1K_V1", True, 64)),
        ProbeInput(
            "random", ids, y.astype(object), X @ projection, meta("randproj", "none", False, 24)
        ),
    ]
    with threadpool_limits(limits=1):  # tiny problem: see test_probe.one_blas_thread
        return run_probe(inputs, ProbeConfig(knn_ks=(10, 20, 100)))


@pytest.fixture(scope="module")
def report_dir(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(results, out)
    return out


def test_results_json_has_the_documented_names(report_dir, results):
    doc = json.loads((report_dir / RESULTS_FILE).read_text())
    assert doc == json.loads(json.dumps(results.to_dict()))
    assert doc["ranking"] == list(results.ranking)
    for name in ("pixels", "random"):
        metrics = doc["datasets"][name]["metrics"]
        for key in ("linear.top1", "linear.top5", "linear.mean_per_class", "knn.k20.top1"):
            assert 0.5 < metrics[key] <= 1.0, key
        assert metrics["linear.C"] in doc["config"]["Cs"]
    assert doc["datasets"]["random"]["provenance"]["weights"]["pretrained"] is False


def test_html_is_self_contained_and_embeds_every_figure(report_dir):
    page = (report_dir / HTML_FILE).read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)
    assert len(images) == len(FIGURES)
    for data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        height, width, _ = imread(io.BytesIO(png)).shape
        assert height > 200 and width > 200
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    for name in FIGURES:
        assert (report_dir / FIGURES_DIR / f"{name}.png").stat().st_size > 1000


def test_random_init_is_never_presented_as_pretrained(report_dir):
    for text in ((report_dir / MARKDOWN_FILE).read_text(), (report_dir / HTML_FILE).read_text()):
        random_row = next(
            line for line in re.split(r"\n|</tr>", text) if re.search(r"\brandom\b.*randproj", line)
        )
        assert "NOT PRETRAINED" in random_row and "(pretrained)" not in random_row
        pixels_row = next(
            line
            for line in re.split(r"\n|</tr>", text)
            if re.search(r"\bpixels\b.*IMAGENET1K_V1", line)
        )
        assert "IMAGENET1K_V1 (pretrained)" in pixels_row
        assert "Not pretrained (or not recorded as pretrained): random." in text


def test_markdown_shows_the_comparison(report_dir, results):
    markdown = (report_dir / MARKDOWN_FILE).read_text()
    best = results.datasets[[d.name for d in results.datasets].index(results.ranking[0])]
    assert f"| 1 | {best.name} |" in markdown
    assert f"{100 * best.linear.metrics.top1:.2f}%" in markdown
    assert f"exact McNemar on the same {results.split.n_test} test images" in markdown
    for name in FIGURES:
        assert f"]({FIGURES_DIR}/{name}.png)" in markdown


def test_render_report_needs_only_results_json(report_dir, tmp_path):
    (tmp_path / RESULTS_FILE).write_bytes((report_dir / RESULTS_FILE).read_bytes())
    files = render_report(tmp_path)
    assert files.markdown.read_text() == (report_dir / MARKDOWN_FILE).read_text()
    assert files.html.read_text() == (report_dir / HTML_FILE).read_text()
    assert [p.name for p in files.figures] == [f"{name}.png" for name in FIGURES]


def test_unreadable_results_are_refused(tmp_path):
    with pytest.raises(ReportError, match="does not exist.*embedpipe probe"):
        render_report(tmp_path)
    (tmp_path / RESULTS_FILE).write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / RESULTS_FILE).write_text(json.dumps({"schema": "embedpipe.probe/0"}))
    with pytest.raises(ReportError, match="schema 'embedpipe.probe/0'"):
        render_report(tmp_path)


def test_protocol_is_a_table_and_checkpoints_show_a_short_name(report_dir, tmp_path):
    markdown = (report_dir / MARKDOWN_FILE).read_text()
    assert "| Embeddings | Backbone | Layer | Dim | Weights | Preprocessing | L2-normalised |" in markdown
    assert '{"' not in markdown  # no raw JSON anywhere
    doc = json.loads((report_dir / RESULTS_FILE).read_text())
    path = "/srv/models/very/long/run-42/checkpoint.pt"
    doc["datasets"]["pixels"]["provenance"]["weights"] = {
        "kind": "checkpoint", "name": path, "pretrained": True, "sha256": "ab12cd34ef56" + "0" * 52,
    }
    (tmp_path / RESULTS_FILE).write_text(json.dumps(doc))
    text = render_report(tmp_path).markdown.read_text()
    assert "checkpoint.pt (ab12cd34) (pretrained)" in text and path not in text


def test_top5_columns_are_left_out_with_five_classes_or_fewer(tmp_path):
    X, y = load_digits(return_X_y=True)
    keep = y < 3
    X, y = X[keep][:240].astype(np.float32), y[keep][:240]
    ids = np.array([f"d{i}" for i in range(len(y))], dtype=object)
    meta = {"backbone": "pixels", "layer": "gap", "dim": 64, "weights": {"name": "x", "pretrained": True}}
    with threadpool_limits(limits=1):
        results = run_probe([ProbeInput("pixels", ids, y.astype(object), X, meta)],
                            ProbeConfig(knn_ks=(10,)))
    markdown = write_report(results, tmp_path).markdown.read_text()
    assert "Top-5" not in markdown and "top-5" not in markdown
    assert f"Only {results.split.n_test} test images" in markdown  # a small test set is flagged


def test_top5_columns_are_shown_with_more_than_five_classes(report_dir):
    text = (report_dir / MARKDOWN_FILE).read_text()
    assert "Top-5" in text and "test images: accuracies move" not in text  # 120 test images


def test_robust_limits_keep_one_outlier_from_squashing_the_rest():
    from embedpipe.figures import robust_limits

    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 2))
    points[7] = (1e6, -1e6)
    (lo, hi), outside = robust_limits(points)
    assert (hi - lo).max() < 10  # the cloud's scale, not the outlier's
    assert outside[7] and outside.sum() < 25


def test_datasets_of_one_backbone_at_several_depths_get_a_depth_curve(tmp_path):
    """Stages of `extract --layer stages` record their depth; the report orders them,
    names the best layer per backbone and draws accuracy against depth."""
    from embedpipe.report import depth_series

    X, y = load_digits(return_X_y=True)
    X, y = X[:300].astype(np.float32), y[:300].astype(object)
    ids = np.array([f"d{i}" for i in range(300)], dtype=object)
    rng = np.random.default_rng(0)

    def stage(layer, depth, noise):
        meta = {"backbone": "resnet18", "layer": layer, "weights": {"name": "w", "pretrained": True}}
        if depth is not None:
            meta["depth"] = depth
        return ProbeInput(layer, ids, y, X + noise * rng.normal(size=X.shape).astype(np.float32), meta)

    inputs = [stage("layer1", 0.25, 30.0), stage("layer2", 0.5, 8.0), stage("layer3", 0.75, 0.5),
              stage("gap", None, 4.0)]
    with threadpool_limits(limits=1):
        results = run_probe(inputs, ProbeConfig(knn_ks=(10,), Cs=(0.01, 1.0)))
    files = write_report(results, tmp_path)
    doc = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert depth_series(doc) == {
        "resnet18 (w)": [(0.25, "layer1"), (0.5, "layer2"), (0.75, "layer3"), (1.0, "gap")]
    }
    markdown = files.markdown.read_text()
    best = max(results.datasets, key=lambda d: d.linear.metrics.top1)
    assert "## Transfer by depth" in markdown and f"| {best.name} (depth" in markdown
    assert "(figures/depth.png)" in markdown and (tmp_path / FIGURES_DIR / "depth.png").is_file()
