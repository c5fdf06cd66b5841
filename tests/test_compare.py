"""Linear CKA held to its definition (Kornblith et al. 2019) and to direct Gram-matrix
implementations of both HSIC estimators; minibatch CKA to the full computation; the
``compare`` command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedpipe.compare import (
    CKAError,
    MinibatchCKA,
    cka_matrix,
    hsic,
    iter_blocks,
    linear_cka,
    row_blocks,
)


def _gram_hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def _gram_hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out literally."""
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    return float(
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ Kt @ Lt @ one)
    ) / (n * (n - 3))


def _gram_cka(X, Y, hsic) -> float:
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("unbiased", [False, True])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(rng, unbiased):
    X = rng.normal(size=(60, 8)) + 3.0
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(X, X @ Q, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, 7.5 * X, unbiased=unbiased) == pytest.approx(1.0, abs=1e-10)
    assert linear_cka(X, X + 100.0, unbiased=unbiased) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
def test_symmetric(rng, unbiased):
    X, Y = rng.normal(size=(40, 5)), rng.normal(size=(40, 9)) @ rng.normal(size=(9, 9))
    Y[:, :5] += X
    assert linear_cka(X, Y, unbiased=unbiased) == pytest.approx(linear_cka(Y, X, unbiased=unbiased), abs=1e-12)


def test_biased_equals_the_gram_matrix_definition(rng):
    X = rng.normal(size=(25, 4)) + 1.0
    Y = np.tanh(X @ rng.normal(size=(4, 6))) + rng.normal(size=(25, 6)) * 0.3
    assert linear_cka(X, Y) == pytest.approx(_gram_cka(X, Y, _gram_hsic_biased), rel=1e-10)


def test_unbiased_equals_the_song_et_al_formula(rng):
    X = rng.normal(size=(25, 4)) + 1.0
    Y = np.tanh(X @ rng.normal(size=(4, 6))) + rng.normal(size=(25, 6)) * 0.3
    expected = _gram_cka(X, Y, _gram_hsic_unbiased)
    assert linear_cka(X, Y, unbiased=True) == pytest.approx(expected, rel=1e-10)
    # the two estimators differ on a small sample: the test tells them apart
    assert abs(linear_cka(X, Y) - expected) > 1e-3


def test_independent_features_score_low_only_with_the_unbiased_estimator(rng):
    X, Y = rng.normal(size=(4000, 16)), rng.normal(size=(4000, 16))
    assert abs(linear_cka(X, Y, unbiased=True)) < 0.1
    # p/n = 0.4 gives the biased estimator a floor well above 0
    Xw, Yw = rng.normal(size=(100, 40)), rng.normal(size=(100, 40))
    assert linear_cka(Xw, Yw) > 0.2
    assert abs(linear_cka(Xw, Yw, unbiased=True)) < 0.1


@pytest.mark.parametrize("unbiased", [False, True])
def test_minibatch_equals_the_full_computation_in_one_block(rng, unbiased):
    X = rng.normal(size=(300, 6))
    Y = X @ rng.normal(size=(6, 10)) + rng.normal(size=(300, 10))
    m = MinibatchCKA(2, unbiased=unbiased).update([X, Y]).result()
    assert m[0, 1] == pytest.approx(linear_cka(X, Y, unbiased=unbiased), rel=1e-12)
    np.testing.assert_allclose(np.diag(m), 1.0)


def test_minibatch_is_close_to_the_full_computation_over_several_blocks(rng):
    X = rng.normal(size=(6000, 8))
    Y = np.tanh(X @ rng.normal(size=(8, 12))) + 0.5 * rng.normal(size=(6000, 12))
    acc = MinibatchCKA(2)
    for block in iter_blocks([X, Y], 1024):
        acc.update(block)
    assert acc.blocks_ == 6 and acc.rows_ == 6000
    assert acc.result()[0, 1] == pytest.approx(linear_cka(X, Y, unbiased=True), abs=0.01)


def test_minibatch_is_the_ratio_of_block_averaged_hsic(rng):
    """Nguyen et al. (2021): average each HSIC over the blocks, then take the ratio."""
    X = rng.normal(size=(40, 3))
    Y = np.concatenate([X[:20] @ rng.normal(size=(3, 4)), rng.normal(size=(20, 4))])  # related, then not
    blocks = [(X[:20], Y[:20]), (X[20:], Y[20:])]
    acc = MinibatchCKA(2)
    for a, b in blocks:
        acc.update([a, b])
    h = {pair: np.mean([hsic(blk[pair[0]], blk[pair[1]], unbiased=True) for blk in blocks])
         for pair in [(0, 1), (0, 0), (1, 1)]}
    assert acc.result()[0, 1] == pytest.approx(h[0, 1] / np.sqrt(h[0, 0] * h[1, 1]), rel=1e-12)


@pytest.mark.parametrize(
    "n, size, lengths",
    [(10, 4, [4, 6]), (9, 4, [4, 5]), (8, 4, [4, 4]), (3, 4, [3]), (2500, 1024, [1024, 1024, 452])],
)
def test_row_blocks_fold_a_tail_too_short_for_the_estimator(n, size, lengths):
    assert [s.stop - s.start for s in row_blocks(n, size)] == lengths


def test_cka_matrix_aligns_rows_by_id(rng):
    X = rng.normal(size=(50, 5))
    Y = X @ rng.normal(size=(5, 7)) + rng.normal(size=(50, 7))
    ids = np.array([f"img{i:03d}" for i in range(50)], dtype=object)
    perm = rng.permutation(50)
    extra = np.array(["only_in_b"], dtype=object)
    datasets = {
        "a": (ids, X),
        # shuffled, with an id the others lack
        "b": (np.concatenate([ids[perm], extra]), np.concatenate([Y[perm], rng.normal(size=(1, 7))])),
        "c": (ids[::-1].copy(), X[::-1] * 2.0),
    }
    names, m = cka_matrix(datasets, block_size=1024)
    assert names == ["a", "b", "c"]
    expected = linear_cka(X, Y, unbiased=True)
    assert m[0, 1] == pytest.approx(expected, rel=1e-10) and m[1, 0] == pytest.approx(expected, rel=1e-10)
    assert m[0, 2] == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(m, m.T)


def test_cka_matrix_refuses_datasets_without_shared_ids(rng):
    a = (np.array(["x1", "x2", "x3", "x4"], dtype=object), rng.normal(size=(4, 2)))
    b = (np.array(["y1", "y2", "y3", "y4"], dtype=object), rng.normal(size=(4, 2)))
    with pytest.raises(CKAError, match="share 0 ids"):
        cka_matrix({"a": a, "b": b})


def test_constant_representation_is_an_error_naming_it(rng):
    with pytest.raises(CKAError, match="constant representation"):
        linear_cka(rng.normal(size=(10, 3)), np.ones((10, 3)))


# --- the command ----------------------------------------------------------------------


def _write_dataset(out, ids, vectors, backbone):
    from embedpipe.provenance import Provenance, WeightsInfo, WeightsKind
    from embedpipe.store import DatasetWriter, embeddings_table

    meta = Provenance(
        backbone=backbone, family="resnet", source="torchvision", layer="gap", dim=vectors.shape[1],
        weights=WeightsInfo(WeightsKind.NONE, "none", pretrained=False, seed=0),
    ).to_json()
    n = len(ids)
    with DatasetWriter(out, meta) as w:
        w.append(embeddings_table(
            ids=list(ids), labels=["x"] * n, vectors=vectors.astype(np.float32), width=[1] * n, height=[1] * n,
            size=[1] * n, mtime_ns=[0] * n, content_hash=["h"] * n, schema=w.schema,
        ))
    return out


def test_compare_command_writes_json_markdown_and_html(tmp_path, rng):
    from click.testing import CliRunner

    from embedpipe.cli import main
    from embedpipe.store import read_embeddings

    X = rng.normal(size=(80, 6))
    Y = np.tanh(X @ rng.normal(size=(6, 10))) + 0.3 * rng.normal(size=(80, 10))
    ids = [f"img{i:03d}.png" for i in range(80)]
    a = _write_dataset(tmp_path / "a", ids, X, "resnet18")
    b = _write_dataset(tmp_path / "b", ids[::-1], Y[::-1], "resnet50")  # another row order
    out = tmp_path / "cka"
    r = CliRunner().invoke(main, ["-q", "compare", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "cka.json").read_text())
    assert doc["names"] == ["a", "b"] and doc["n"] == 80 and doc["estimator"] == "unbiased"
    assert [d["backbone"] for d in doc["provenance"]] == ["resnet18", "resnet50"]
    assert doc["provenance"][0]["layer"] == "gap"
    # against the stored float32 vectors, which is what the command read
    Xs, Ys = read_embeddings(a).vectors, read_embeddings(b).vectors[::-1]
    assert doc["matrix"][0][1] == pytest.approx(linear_cka(Xs, Ys, unbiased=True), rel=1e-9)
    assert doc["matrix"][0][0] == pytest.approx(1.0)
    assert "| a |" in (out / "cka.md").read_text()
    html = (out / "cka.html").read_text()
    assert "data:image/png;base64," in html and "resnet50" in html
    r = CliRunner().invoke(main, ["-q", "compare", str(a), str(b), "--out", str(out), "--biased"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "cka.json").read_text())
    assert doc["estimator"] == "biased"
    assert doc["matrix"][0][1] == pytest.approx(linear_cka(Xs, Ys), rel=1e-9)


def test_compare_command_names_a_missing_overlap(tmp_path, rng):
    from click.testing import CliRunner

    from embedpipe.cli import main

    a = _write_dataset(tmp_path / "a", ["p", "q", "r", "s"], rng.normal(size=(4, 3)), "resnet18")
    b = _write_dataset(tmp_path / "b", ["t", "u", "v", "w"], rng.normal(size=(4, 3)), "resnet18")
    r = CliRunner().invoke(main, ["compare", str(a), str(b), "--out", str(tmp_path / "cka")])
    assert r.exit_code == 1 and "share 0 ids" in r.output
