"""The report files: results.json names, self-contained HTML, re-rendering from JSON alone."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import require
from matplotlib.image import imread
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from embedpipe.compare import linear_cka
from embedpipe.config import MapMethod
from embedpipe.errors import ReportError
from embedpipe.maps import MapParams, project
from embedpipe.probe import ProbeConfig, ProbeInput, run_probe
from embedpipe.report import (
    FIGURES_DIR,
    HTML_FILE,
    MARKDOWN_FILE,
    RESULTS_FILE,
    load_results,
    render_report,
    views,
    write_report,
)
from embedpipe.report.plots import map_points

FIGURES = ("accuracy", "validation_curve", "confusion_matrix", "map", "cka")
#: the map of the reports here: PCA, fast; UMAP's first fit in a process compiles for ~20 s
PCA_MAP = MapParams(method=MapMethod.PCA)


@pytest.fixture(scope="module")
def inputs():
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

    return [
        ProbeInput("pixels", ids, y.astype(object), X, meta("pixels", "IMAGENET1K_V1", True, 64)),
        ProbeInput(
            "random", ids, y.astype(object), X @ projection, meta("randproj", "none", False, 24)
        ),
    ]


@pytest.fixture(scope="module")
def results(inputs):
    with threadpool_limits(limits=1):  # tiny problem: see test_probe.one_blas_thread
        return run_probe(inputs, ProbeConfig(knn_ks=(10, 20, 100)))


@pytest.fixture(scope="module")
def report_dir(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(results, out, map_params=PCA_MAP)
    return out


def test_results_json_has_the_documented_names(report_dir, results):
    doc = json.loads((report_dir / RESULTS_FILE).read_text())
    assert set(doc) - set(results.to_dict()) == {"map", "cka"}  # the views write_report adds
    assert {k: v for k, v in doc.items() if k not in ("map", "cka")} == json.loads(json.dumps(results.to_dict()))
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
    markdown = write_report(results, tmp_path, map_params=PCA_MAP).markdown.read_text()
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
    files = write_report(results, tmp_path, map_params=PCA_MAP)
    doc = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert depth_series(doc) == {
        "resnet18 (w)": [(0.25, "layer1"), (0.5, "layer2"), (0.75, "layer3"), (1.0, "gap")]
    }
    markdown = files.markdown.read_text()
    best = max(results.datasets, key=lambda d: d.linear.metrics.top1)
    assert "## Transfer by depth" in markdown and f"| {best.name} (depth" in markdown
    assert "(figures/depth.png)" in markdown and (tmp_path / FIGURES_DIR / "depth.png").is_file()
    # CKA between the layers, and between each layer and the next, shallow to deep
    cka = doc["cka"]
    assert cka["names"] == ["layer1", "layer2", "layer3", "gap"]
    step = [cka["matrix"][i][i + 1] for i in (0, 1)] + [cka["matrix"][2][3]]
    assert ("Consecutive layers of resnet18 (w): layer1 → layer2 {:.3f} · layer2 → layer3 {:.3f} · "
            "layer3 → gap {:.3f}".format(*step)) in markdown


# --- the map and the CKA matrix --------------------------------------------------------


def test_map_marks_exactly_the_test_images_the_linear_probe_got_wrong(report_dir, inputs):
    """Recomputed independently: scikit-learn's LogisticRegression at the selected C on the
    same split (train + validation rows standardised, in id order)."""
    doc = json.loads((report_dir / RESULTS_FILE).read_text())
    split = doc["split"]
    test = np.isin(inputs[0].ids, split["test_ids"])
    assert doc["sample"]["of"] == len(doc["sample"]["ids"]) == 600  # all rows: every test row is on the map
    for d in inputs:
        X = d.vectors.astype(np.float64)
        y = d.labels.astype(np.int64)
        scaler = StandardScaler().fit(X[~test])
        linear = doc["datasets"][d.name]["linear"]
        reference = LogisticRegression(C=linear["C"], max_iter=doc["config"]["max_iter"], tol=doc["config"]["tol"])
        reference.fit(scaler.transform(X[~test]), y[~test])
        wrong = set(d.ids[test][reference.predict(scaler.transform(X[test])) != y[test]])
        assert len(wrong) >= 3  # something to mark
        _, labels, marked = map_points(doc, d.name)
        assert set(np.asarray(doc["sample"]["ids"])[marked]) == wrong
        assert labels.tolist() == [int(v) for v in d.labels]  # coloured by label (digits: index == label)


@pytest.mark.parametrize("method", [MapMethod.PCA, pytest.param(MapMethod.UMAP, marks=pytest.mark.slow)])
def test_map_coordinates_are_those_of_embedpipe_map_for_the_same_seed(results, inputs, method, tmp_path):
    if method is MapMethod.UMAP:
        require("umap", "UMAP maps")
    params = MapParams(method=method, seed=3)
    write_report(results, tmp_path, map_params=params)
    doc = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert doc["map"]["params"]["method"] == method.value and doc["map"]["params"]["seed"] == 3
    for d in inputs:
        rows = pd.Index(d.ids).get_indexer(doc["sample"]["ids"])
        expected, _, _ = project(d.vectors[rows], params)
        xy, _, _ = map_points(doc, d.name)
        np.testing.assert_allclose(xy, expected, atol=6e-5, rtol=0)  # results.json rounds to 1e-4
    title = {MapMethod.PCA: "PCA · seed 3", MapMethod.UMAP: "UMAP · n_neighbors 15 · min_dist 0.1 · cosine · seed 3"}
    assert title[method] in (tmp_path / MARKDOWN_FILE).read_text()


def test_cka_matrix_is_compare_linear_cka_of_the_aligned_vectors(report_dir, inputs):
    doc = json.loads((report_dir / RESULTS_FILE).read_text())
    cka = doc["cka"]
    assert cka["names"] == ["pixels", "random"] and cka["estimator"] == "unbiased" and cka["n"] == 600
    matrix = np.asarray(cka["matrix"])
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0, rtol=0, atol=1e-12)
    direct = linear_cka(inputs[0].vectors, inputs[1].vectors, unbiased=True)
    np.testing.assert_allclose(matrix[0, 1], direct, rtol=1e-12)
    assert 0.3 < direct < 0.99  # related representations, not the same one
    markdown = (report_dir / MARKDOWN_FILE).read_text()
    assert "## Representation similarity (linear CKA)" in markdown and f"| pixels | 1.000 | {direct:.3f} |" in markdown


def test_cka_is_one_for_an_orthogonal_rotation_and_sampled_when_large(inputs):
    """CKA is invariant to rotations; on more rows than ``projection_samples`` it is
    computed on a seeded sample of them, the rows the map shows."""
    pixels = inputs[0]
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(64, 64)))
    rotated = ProbeInput("rotated", pixels.ids, pixels.labels, pixels.vectors @ rotation.astype(np.float32),
                         {**pixels.meta, "backbone": "rotated"})
    random = inputs[1]
    with threadpool_limits(limits=1):
        results = run_probe([pixels, rotated, random], ProbeConfig(knn_ks=(10,), Cs=(1.0,), projection_samples=150))
    doc = views(results, PCA_MAP)
    cka = np.asarray(doc["cka"]["matrix"])
    assert doc["cka"]["n"] == len(results.sample.ids) == 150 and results.sample.of == 600
    np.testing.assert_allclose(cka[0, 1], 1.0, atol=1e-6)
    rows = pd.Index(pixels.ids).get_indexer(results.sample.ids)
    np.testing.assert_allclose(cka[0, 2], linear_cka(pixels.vectors[rows], random.vectors[rows], unbiased=True),
                               rtol=1e-12)
    # a different sample gives a different estimate: the sample was used, not all rows
    assert abs(cka[0, 2] - linear_cka(pixels.vectors, random.vectors, unbiased=True)) > 1e-6
