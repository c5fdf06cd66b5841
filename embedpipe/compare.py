"""Representation similarity: linear CKA between embeddings of the same images.

Linear centred kernel alignment (Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of
Neural Network Representations Revisited") compares two representations X (n, p) and
Y (n, q) of the same n examples through their linear Gram matrices K = X Xᵀ and L = Y Yᵀ:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

It is 1 for representations that differ by an orthogonal transform and an isotropic
scaling (and a translation), and near 0 for unrelated ones. Two estimators of HSIC:

* biased (Gretton et al. 2005): ``tr(K H L H) / (n-1)^2`` with the centring matrix
  ``H = I - 11ᵀ/n``. Its CKA of independent features is far from 0 when p is not << n.
* unbiased (Song et al. 2012), the one minibatch CKA uses (Nguyen, Raghu & Kornblith
  2021): with K̃, L̃ the Grams with their diagonals zeroed,
  ``[tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK̃L̃1] / (n(n-3))``.

Both are computed here from the features, never from an n x n Gram: every term is a
cross-product ``XᵀY`` (p x q), a row norm or a column sum, so memory is O(pq + n(p+q)).
:class:`MinibatchCKA` goes further and streams blocks of rows (Nguyen et al.'s minibatch
CKA: HSIC averaged over blocks, then the ratio), so the aligned rows of a large dataset
are never copied at once. Compute only: callers open the files.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EmbedpipeError
from .files import atomic_write_bytes, atomic_write_text
from .provenance import Provenance

#: rows per block of :class:`MinibatchCKA` in :func:`cka_matrix`
BLOCK_SIZE = 1024


class CKAError(EmbedpipeError, ValueError):
    """Representations that cannot be compared (too few rows, rows that do not match)."""


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise CKAError(f"{name} must be a 2-D (n, features) array, got shape {a.shape}; reshape it to (n, -1)")
    return a.astype(np.float64, copy=False)


def hsic(X: np.ndarray, Y: np.ndarray, *, unbiased: bool) -> float:
    """HSIC of the linear kernels of X (n, p) and Y (n, q), any float dtype, computed in
    float64 from the features (O(n(p+q) + pq) memory, no n x n Gram).

    Both estimators are invariant to translating X or Y, so the columns are centred first:
    that keeps the cancellations of the unbiased formula small.
    """
    X = _as_2d("X", X)
    Y = _as_2d("Y", Y)
    n = X.shape[0]
    if Y.shape[0] != n:
        raise CKAError(f"X has {n} rows but Y has {Y.shape[0]}; both must describe the same examples in the same order")
    if n < (4 if unbiased else 2):
        raise CKAError(f"{'unbiased' if unbiased else 'biased'} HSIC needs at least {4 if unbiased else 2} rows, got {n}")
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    cross = float(np.square(X.T @ Y).sum())  # ||XᵀY||_F^2 = tr(K L)
    if not unbiased:
        # centred features: K H = X Xᵀ with X centred, so tr(KHLH) = ||XᵀY||_F^2
        return cross / (n - 1) ** 2
    kd = np.einsum("ij,ij->i", X, X)  # diag(K)
    ld = np.einsum("ij,ij->i", Y, Y)  # diag(L)
    trace = cross - float(kd @ ld)  # tr(K̃ L̃): the off-diagonal products
    k1 = X @ X.sum(0) - kd  # K̃ 1: (n,)
    l1 = Y @ Y.sum(0) - ld
    sum_k = float(k1.sum())  # 1ᵀ K̃ 1
    sum_l = float(l1.sum())
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(k1 @ l1)) / (n * (n - 3))


def _ratio(hxy: float, hxx: float, hyy: float) -> float:
    denom = np.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else 0.0
    if denom == 0.0:
        raise CKAError(
            "CKA is undefined for a constant representation (its HSIC with itself is "
            f"{min(hxx, hyy):.3g}); drop it or check the embeddings"
        )
    return float(hxy / denom)


def linear_cka(X: np.ndarray, Y: np.ndarray, *, unbiased: bool = False) -> float:
    """Linear CKA of X (n, p) and Y (n, q), rows the same n examples in the same order.

    ``unbiased``: the Song et al. (2012) HSIC estimator (needs n >= 4); its CKA of
    independent features is near 0 (it may be slightly negative), where the biased one's
    grows with p/n.
    """
    return _ratio(
        hsic(X, Y, unbiased=unbiased),
        hsic(X, X, unbiased=unbiased),
        hsic(Y, Y, unbiased=unbiased),
    )


class MinibatchCKA:
    """Linear CKA between k representations, streamed over blocks of rows.

    Each :meth:`update` takes one block: k arrays of the same b rows (b >= 4 unbiased),
    each (b, p_i); it adds the block's HSIC of every pair to running sums, so memory is one
    block plus the k x k sums. :meth:`result` is the (k, k) float64 matrix
    ``mean_b HSIC(i, j) / sqrt(mean_b HSIC(i, i) mean_b HSIC(j, j))`` (Nguyen et al. 2021).
    With one block it is exactly :func:`linear_cka`; with several it estimates the same
    quantity (unbiasedly per block when ``unbiased``; the biased estimator's bias then
    depends on the block size, which is why unbiased is the default).
    """

    def __init__(self, k: int, *, unbiased: bool = True) -> None:
        if k < 1:
            raise CKAError(f"MinibatchCKA compares k >= 1 representations, got k={k}")
        self.k = k
        self.unbiased = unbiased
        self.hsic_sum_ = np.zeros((k, k), np.float64)
        self.blocks_ = 0
        self.rows_ = 0

    def update(self, block: Sequence[np.ndarray]) -> MinibatchCKA:
        """Add one block: ``block[i]`` is representation i of the same b rows, (b, p_i)."""
        if len(block) != self.k:
            raise CKAError(f"a block must hold {self.k} representations (one per name), got {len(block)}")
        for i in range(self.k):
            for j in range(i, self.k):
                h = hsic(block[i], block[j], unbiased=self.unbiased)
                self.hsic_sum_[i, j] += h
                if i != j:
                    self.hsic_sum_[j, i] += h
        self.blocks_ += 1
        self.rows_ += len(block[0])
        return self

    def result(self) -> np.ndarray:
        """The (k, k) CKA matrix; symmetric, 1 on the diagonal."""
        if self.blocks_ == 0:
            raise CKAError("MinibatchCKA has seen no block; call update() first")
        h = self.hsic_sum_ / self.blocks_
        out = np.empty_like(h)
        for i in range(self.k):
            for j in range(self.k):
                out[i, j] = _ratio(h[i, j], h[i, i], h[j, j])
        return out


def row_blocks(n: int, block_size: int, *, min_rows: int = 4) -> list[slice]:
    """Slices of ``range(n)`` at most ``block_size`` long; a short tail (< ``min_rows``,
    too few for the unbiased estimator) joins the block before it."""
    if block_size < min_rows:
        raise CKAError(f"block_size must be at least {min_rows}, got {block_size}")
    starts = list(range(0, n, block_size))
    if len(starts) > 1 and n - starts[-1] < min_rows:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, [*starts[1:], n])]


def shared_ids(datasets: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The ids every dataset holds, sorted: (n,) object str."""
    common: set | None = None
    for ids, _ in datasets.values():
        common = set(ids.tolist()) if common is None else common & set(ids.tolist())
    return np.array(sorted(common or ()), dtype=object)


def cka_matrix(
    datasets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    unbiased: bool = True,
    block_size: int = BLOCK_SIZE,
) -> tuple[list[str], np.ndarray]:
    """Linear CKA between every pair of datasets, on the ids they share.

    ``datasets``: name -> (ids (n_i,) str, vectors (n_i, d_i) float). Rows are aligned by
    id (the sorted intersection, :func:`shared_ids`) and gathered one block of
    ``block_size`` rows at a time into a :class:`MinibatchCKA`, so no aligned copy of a
    whole dataset is made. Returns (names, (k, k) float64 matrix).
    """
    names = list(datasets)
    if not names:
        raise CKAError("cka_matrix needs at least one dataset")
    ids = shared_ids(datasets)
    min_rows = 4 if unbiased else 2
    if len(ids) < min_rows:
        raise CKAError(
            f"the datasets share {len(ids)} ids ({', '.join(names)}); CKA needs at least "
            f"{min_rows}: embed the same images with each backbone"
        )
    positions = []
    for name, (own_ids, vectors) in datasets.items():
        if len(own_ids) != len(vectors):
            raise CKAError(f"{name!r} has {len(own_ids)} ids but {len(vectors)} vectors")
        where = {v: i for i, v in enumerate(own_ids.tolist())}
        if len(where) != len(own_ids):
            raise CKAError(f"{name!r} repeats ids; each id must name one row")
        positions.append(np.fromiter((where[i] for i in ids), np.int64, len(ids)))
    acc = MinibatchCKA(len(names), unbiased=unbiased)
    for rows in row_blocks(len(ids), block_size, min_rows=min_rows):
        acc.update([vectors[pos[rows]] for (_, vectors), pos in zip(datasets.values(), positions)])
    return names, acc.result()


def iter_blocks(arrays: Sequence[np.ndarray], block_size: int) -> Iterable[list[np.ndarray]]:
    """Blocks of the same rows of aligned arrays, for :meth:`MinibatchCKA.update`."""
    for rows in row_blocks(len(arrays[0]), block_size):
        yield [a[rows] for a in arrays]


# --- the written result -----------------------------------------------------------------


@dataclass(frozen=True)
class CKAResult:
    """A CKA matrix and what it was computed from.

    ``matrix``: (k, k) float64, rows and columns in the order of ``names``; ``n``: the
    shared rows used; ``provenance``: what made each dataset (same order).
    """

    names: list[str]
    matrix: np.ndarray
    n: int
    unbiased: bool
    provenance: list[Provenance] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "estimator": "unbiased" if self.unbiased else "biased",
            "n": self.n,
            "matrix": self.matrix.tolist(),
            "provenance": [p.to_json() for p in self.provenance],
        }


def cka_heatmap(result: CKAResult) -> bytes:
    """The CKA matrix as a PNG heatmap, each cell annotated (`compare` and the probe report)."""
    from matplotlib.figure import Figure

    from .figures import png, shorten

    k = len(result.names)
    size = 1.6 + 0.55 * k
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    im = ax.imshow(result.matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    labels = [shorten(n, 20) for n in result.names]
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    for i in range(k):
        for j in range(k):
            v = result.matrix[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > 0.6 else "white")
    estimator = "unbiased" if result.unbiased else "biased"
    ax.set_title(f"linear CKA ({estimator}), n = {result.n}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return png(fig)


def _markdown(result: CKAResult) -> str:
    estimator = "unbiased (Song et al. 2012)" if result.unbiased else "biased"
    lines = [
        "# Linear CKA", "",
        (f"{result.n} shared images; HSIC estimator: {estimator}. 1: the same representation up to "
         "rotation and scale; near 0: unrelated."), "", "![linear CKA heatmap](cka.png)", "",
        "| | " + " | ".join(result.names) + " |",
        "|---|" + "---|" * len(result.names),
    ]
    for name, row in zip(result.names, result.matrix):
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    lines += ["", "## Datasets", ""]
    for name, prov in zip(result.names, result.provenance):
        lines.append(f"- **{name}**: {prov.describe()}")
    return "\n".join(lines) + "\n"


def _html(result: CKAResult, heatmap: bytes) -> str:
    import base64

    from .figures import PAGE_CSS

    esc = html.escape
    head = "".join(f"<th>{esc(n)}</th>" for n in result.names)
    rows = "".join(
        f"<tr><th>{esc(name)}</th>" + "".join(f"<td>{v:.3f}</td>" for v in row) + "</tr>"
        for name, row in zip(result.names, result.matrix)
    )
    items = "".join(
        f"<li><b>{esc(n)}</b>: {esc(p.describe())}</li>" for n, p in zip(result.names, result.provenance)
    )
    data = base64.b64encode(heatmap).decode("ascii")
    estimator = "unbiased (Song et al. 2012)" if result.unbiased else "biased"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Linear CKA</title>"
        f"<style>{PAGE_CSS}</style></head><body><h1>Linear CKA</h1>"
        f"<p>{result.n} shared images; HSIC estimator: {estimator}.</p>"
        f'<figure><img alt="CKA heatmap" src="data:image/png;base64,{data}">'
        "<figcaption>Linear CKA between every pair of datasets</figcaption></figure>"
        f"<table><tr><th></th>{head}</tr>{rows}</table><h2>Datasets</h2><ul>{items}</ul></body></html>\n"
    )


@dataclass(frozen=True)
class CKAFiles:
    json: Path
    markdown: Path
    html: Path
    png: Path


def write_cka(result: CKAResult, out: str | os.PathLike) -> CKAFiles:
    """``out``/cka.json, cka.md, cka.png (the heatmap) and cka.html (a self-contained
    page), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = CKAFiles(out / "cka.json", out / "cka.md", out / "cka.html", out / "cka.png")
    heatmap = cka_heatmap(result)
    atomic_write_bytes(heatmap, files.png)
    atomic_write_text(json.dumps(result.to_json(), indent=2) + "\n", files.json)
    atomic_write_text(_markdown(result), files.markdown)
    atomic_write_text(_html(result, heatmap), files.html)
    return files
