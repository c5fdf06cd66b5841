"""embedpipe map: reproducible coordinates, exact neighbours, files other tools read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import require, tiny_dataset

from embedpipe.cli import main
from embedpipe.config import MapMethod
from embedpipe.maps import MapParams, build_map, read_map, update_map, write_map
from embedpipe.provenance import Provenance


def clusters(n=300, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, d)) * 4
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(size=(n, d)), np.array([f"c{c}" for c in labels], dtype=object)


def test_neighbours_are_exact_cosine_neighbours():
    x, labels = clusters()
    m = build_map(np.arange(len(x)).astype(str), labels, x, MapParams(method=MapMethod.PCA, k=7))
    rows, sims, exact = m.neighbors, m.similarity, m.notes["neighbors"] == "exact"
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    gram = unit @ unit.T
    np.fill_diagonal(gram, -np.inf)
    expected = np.argsort(-gram, axis=1)[:, :7]
    assert exact and (rows == expected).mean() > 0.999  # ties aside
    np.testing.assert_allclose(sims, np.take_along_axis(gram, expected, 1), rtol=1e-5, atol=1e-5)
    assert not (rows == np.arange(len(x))[:, None]).any()


@pytest.mark.parametrize("method", [MapMethod.PCA, MapMethod.UMAP])
def test_coordinates_are_reproducible_for_a_seed(method):
    if method is MapMethod.UMAP:
        require("umap", "UMAP maps")
    x, labels = clusters()
    ids = np.array([f"{i}.png" for i in range(len(x))], dtype=object)
    a = build_map(ids, labels, x, MapParams(method=method, seed=3))
    b = build_map(ids, labels, x, MapParams(method=method, seed=3))
    np.testing.assert_array_equal(a.xy, b.xy)
    assert a.xy.shape == (len(x), 2) and np.isfinite(a.xy).all()


def test_pca_map_is_scikit_learns_pca_of_the_unit_vectors():
    from sklearn.decomposition import PCA

    x, labels = clusters()
    m = build_map(np.arange(len(x)).astype(str).astype(object), labels, x, MapParams(method="pca"))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(m.xy, PCA(2, random_state=0).fit_transform(unit), rtol=1e-4, atol=1e-4)


def test_the_parquet_is_what_embedding_atlas_and_notebooks_read(tmp_path):
    duckdb = require("duckdb", "reading the map with DuckDB")
    x, labels = clusters(60)
    ids = np.array([f"{i:03d}.png" for i in range(60)], dtype=object)
    m = build_map(ids, labels, x, MapParams(method="pca", k=5))
    write_map(m, tmp_path, provenance=Provenance.from_json({"backbone": "lenet5", "layer": "gap"}))
    import pandas as pd

    df = pd.read_parquet(tmp_path / "map.parquet")
    assert list(df.columns) == ["id", "label", "x", "y", "neighbors", "neighbor_ids", "neighbor_similarity"]
    first = df.iloc[0]
    # embedding-atlas: {"ids": zero-based row indices, "distances": [...]}
    assert list(first["neighbors"]["ids"]) == list(m.neighbors[0])
    np.testing.assert_allclose(first["neighbors"]["distances"], 1 - m.similarity[0], rtol=1e-6)
    assert list(first["neighbor_ids"]) == [ids[r] for r in m.neighbors[0]]
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path / 'map.parquet'}')").fetchall()[0][0]
    assert n == 60
    assert json.loads((tmp_path / "map.json").read_text())["params"]["method"] == "pca"
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"


def test_update_places_new_rows_without_moving_the_old(tmp_path):
    x, labels = clusters(200)
    ids = np.array([f"{i:03d}" for i in range(200)], dtype=object)
    old = build_map(ids[:150], labels[:150], x[:150], MapParams(method="pca"))
    write_map(old, tmp_path, provenance=Provenance())
    new = update_map(read_map(tmp_path), ids, labels, x)
    np.testing.assert_allclose(new.xy[:150], old.xy, rtol=1e-6)
    unit = x[150:] / np.linalg.norm(x[150:], axis=1, keepdims=True)
    np.testing.assert_allclose(new.xy[150:], old.reducer.transform(unit), rtol=1e-5, atol=1e-5)
    assert new.notes["updated_rows"] == 50


def test_cli_maps_a_dataset(tmp_path):
    x, labels = clusters(40, d=8)
    tiny_dataset(tmp_path / "emb", x, labels=labels)
    r = CliRunner().invoke(main, ["map", str(tmp_path / "emb"), "--out", str(tmp_path / "map"), "--method", "pca",
                                  "-k", "4"])
    assert r.exit_code == 0, r.output
    assert "40 rows mapped (pca; neighbours exact)" in r.output
    assert read_map(tmp_path / "map").neighbors.shape == (40, 4)
