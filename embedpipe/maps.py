"""A 2-D map of an embeddings dataset: coordinates for every row, and its nearest neighbours.

``embedpipe map EMB --out MAP`` writes ``MAP/map.parquet``: ``id``, ``label``, ``x``, ``y``
and ``neighbors`` (a struct of ``ids``, zero-based row indices, and ``distances``, 1 -
cosine, nearest first), the layout Apple's embedding-atlas reads as it is
(``embedding-atlas map.parquet --x x --y y --neighbors neighbors``), plus ``neighbor_ids``
and ``neighbor_similarity`` for notebooks; ``map.png``, points coloured by label with a
sample of thumbnails placed at their coordinates; ``map.json``, the method and every
parameter; and the fitted reducer, so that ``--update`` places new rows without refitting
(as FiftyOne's incremental visualisation does).

Reducers are well-kept libraries': umap-learn's UMAP (the default, seeded), scikit-learn's
PCA and t-SNE. UMAP and PCA are fitted on at most ``fit_sample`` rows (a seeded uniform
sample) and place the rest with ``transform``: a million rows cost a fit on 50,000 plus
a cheap transform. t-SNE has no transform: it embeds every row at once, and cannot update.

Neighbours come from :func:`embedpipe.neighbours.knn_graph`: exact (inner product of
L2-normalised vectors, FAISS flat search) up to 200,000 rows; above that an IVF index
tuned to a measured recall@k finds them (the method and the recall are in ``map.json``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import MapMethod
from .errors import MissingDependencyError, StoreError
from .figures import png
from .files import atomic_write, atomic_write_bytes, atomic_write_text
from .neighbours import knn_graph, l2_normalize
from .provenance import Provenance

MAP_FILE = "map.parquet"
PARAMS_FILE = "map.json"
REDUCER_FILE = "reducer.joblib"
PNG_FILE = "map.png"

@dataclass(frozen=True)
class MapParams:
    """Everything that decided the coordinates (written to ``map.json``)."""

    method: MapMethod = MapMethod.UMAP
    seed: int = 0
    k: int = 10
    n_neighbors: int = 15  # UMAP
    min_dist: float = 0.1  # UMAP
    perplexity: float = 30.0  # t-SNE
    fit_sample: int = 50_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", MapMethod(self.method))
        if self.k < 1 or self.fit_sample < 2:
            raise ValueError(f"k must be >= 1 and fit_sample >= 2, got {self.k}, {self.fit_sample}")


@dataclass
class EmbeddingMap:
    """``xy``: (n, 2) float32; ``neighbors``: (n, k) int64 row indices, nearest first;
    ``similarity``: (n, k) float32 cosine."""

    ids: np.ndarray
    labels: np.ndarray
    xy: np.ndarray
    neighbors: np.ndarray
    similarity: np.ndarray
    params: MapParams
    reducer: Any = None
    notes: dict[str, Any] = field(default_factory=dict)

    def to_arrow(self) -> pa.Table:
        k = self.neighbors.shape[1]
        distances = (1.0 - self.similarity).astype(np.float32)
        neighbors = pa.StructArray.from_arrays(
            [_lists(self.neighbors.astype(np.int64), k), _lists(distances, k)], names=["ids", "distances"]
        )
        ids = self.ids.astype(object)
        return pa.table({
            "id": pa.array(ids, pa.string()),
            "label": pa.array(self.labels, pa.string()),
            "x": pa.array(self.xy[:, 0], pa.float32()),
            "y": pa.array(self.xy[:, 1], pa.float32()),
            "neighbors": neighbors,
            # the ids column taken at the neighbour rows: no Python loop over rows
            "neighbor_ids": _lists(pa.array(ids, pa.string()).take(self.neighbors.reshape(-1)), k),
            "neighbor_similarity": _lists(self.similarity.astype(np.float32), k),
        })


def _lists(values: np.ndarray | pa.Array, k: int) -> pa.Array:
    """(n, k) values (an array, or an Arrow array of n * k) -> a list column of n rows of k."""
    flat = values if isinstance(values, pa.Array) else pa.array(np.asarray(values).reshape(-1))
    offsets = pa.array(np.arange(0, len(flat) + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _reducer(params: MapParams, n: int):
    if params.method is MapMethod.PCA:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=params.seed)
    if params.method is MapMethod.TSNE:
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(params.perplexity, (n - 1) / 3), random_state=params.seed,
                    init="pca")
    try:
        import umap
    except ImportError as e:
        raise MissingDependencyError(f'UMAP maps need umap-learn ({e}): pip install "embedpipe[map]"') from e
    return umap.UMAP(n_components=2, n_neighbors=min(params.n_neighbors, n - 1), min_dist=params.min_dist,
                     metric="cosine", random_state=params.seed, n_jobs=1)


def check_available(method: MapMethod) -> None:
    """Raise :class:`MissingDependencyError` now, before any long work, if ``method``'s
    library is missing (UMAP: umap-learn, from the ``map`` extra)."""
    import importlib.util

    if MapMethod(method) is MapMethod.UMAP and importlib.util.find_spec("umap") is None:
        raise MissingDependencyError('UMAP maps need umap-learn: pip install "embedpipe[map]" (or --map-method pca)')


def project(vectors: np.ndarray, params: MapParams) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """(n, D) -> ((n, 2) float32 coordinates, the fitted reducer, notes). UMAP and PCA are
    fitted on at most ``params.fit_sample`` rows and transform the rest."""
    x = l2_normalize(vectors)
    n = len(x)
    reducer = _reducer(params, n)
    started = time.perf_counter()
    if params.method is MapMethod.TSNE:
        return reducer.fit_transform(x).astype(np.float32), None, {"fitted_rows": n}
    rng = np.random.default_rng(params.seed)
    fit_rows = np.sort(rng.choice(n, params.fit_sample, replace=False)) if n > params.fit_sample else None
    if fit_rows is None:
        xy = reducer.fit_transform(x)
    else:
        reducer.fit(x[fit_rows])
        xy = reducer.transform(x)
    notes = {"fitted_rows": n if fit_rows is None else len(fit_rows), "seconds": round(time.perf_counter() - started, 2)}
    return np.asarray(xy, dtype=np.float32), reducer, notes


def build_map(ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray, params: MapParams) -> EmbeddingMap:
    """The map of one dataset's rows: coordinates and neighbours."""
    if len(ids) < 3:
        raise StoreError(f"a map needs at least 3 rows, got {len(ids)}")
    xy, reducer, notes = project(vectors, params)
    graph = knn_graph(vectors, min(params.k, len(ids) - 1))
    notes["neighbors"] = graph.describe()
    return EmbeddingMap(np.asarray(ids, dtype=object), np.asarray(labels, dtype=object), xy,
                        graph.neighbours, graph.similarities, params, reducer, notes)


def update_map(old: EmbeddingMap, ids: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> EmbeddingMap:
    """Place rows new since ``old`` with its fitted reducer (no refit); rows that are gone
    are dropped, kept rows keep their coordinates; neighbours are found again for all."""
    if old.reducer is None:
        raise StoreError(f"a {old.params.method} map cannot place new rows; build it again without --update")
    where = {i: r for r, i in enumerate(old.ids)}
    kept = np.array([i in where for i in ids])
    xy = np.empty((len(ids), 2), np.float32)
    xy[kept] = old.xy[[where[i] for i in np.asarray(ids)[kept]]]
    if (~kept).any():
        xy[~kept] = np.asarray(old.reducer.transform(l2_normalize(vectors[~kept])), dtype=np.float32)
    graph = knn_graph(vectors, min(old.params.k, len(ids) - 1))
    notes = {**old.notes, "updated_rows": int((~kept).sum()), "neighbors": graph.describe()}
    return EmbeddingMap(np.asarray(ids, dtype=object), np.asarray(labels, dtype=object), xy,
                        graph.neighbours, graph.similarities, old.params, old.reducer, notes)


# --- files ---------------------------------------------------------------------------------


def write_map(m: EmbeddingMap, out: Path, *, provenance: Provenance, images: Path | None = None) -> None:
    """``map.parquet``, ``map.json``, the reducer and ``map.png`` into ``out``."""
    import joblib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = m.to_arrow()
    atomic_write(out / MAP_FILE, lambda tmp: pq.write_table(table, tmp))
    doc = {"params": {**asdict(m.params), "method": str(m.params.method)}, "rows": len(m.ids),
           "notes": m.notes, "embeddings": provenance.to_json()}
    atomic_write_text(json.dumps(doc, indent=2, default=str) + "\n", out / PARAMS_FILE)
    if m.reducer is not None:
        atomic_write(out / REDUCER_FILE, lambda tmp: joblib.dump(m.reducer, tmp))
    atomic_write_bytes(render_map(m, title=provenance.title(), images=images), out / PNG_FILE)


def read_map(out: Path) -> EmbeddingMap:
    """A map written by :func:`write_map`. Its reducer is a joblib (pickle) file that
    ``embedpipe map`` wrote: load maps you made, as you would any pickle."""
    import joblib

    out = Path(out)
    if not (out / MAP_FILE).is_file():
        raise StoreError(f"{out} holds no {MAP_FILE}; make one with `embedpipe map EMBEDDINGS --out {out}`")
    table = pq.read_table(out / MAP_FILE)
    doc = json.loads((out / PARAMS_FILE).read_text())
    params = MapParams(**doc["params"])
    neighbors = table.column("neighbors").combine_chunks()
    k = params.k if len(table) > params.k else len(table) - 1
    rows = np.asarray(neighbors.field("ids").flatten()).reshape(len(table), k)
    dist = np.asarray(neighbors.field("distances").flatten()).reshape(len(table), k)
    reducer = joblib.load(out / REDUCER_FILE) if (out / REDUCER_FILE).is_file() else None
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1)
    return EmbeddingMap(np.asarray(table.column("id").to_pylist(), dtype=object),
                        np.asarray(table.column("label").to_pylist(), dtype=object), xy, rows,
                        (1 - dist).astype(np.float32), params, reducer, doc.get("notes", {}))


def render_map(m: EmbeddingMap, *, title: str, images: Path | None = None, thumbnails: int = 24) -> bytes:
    """Points coloured by label (at most 20 colours named in the legend), and a seeded
    sample of ``thumbnails`` images drawn at their coordinates when ``images`` is given."""
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    from .images.thumbnails import thumbnail

    fig = Figure(figsize=(9, 7.5), layout="constrained")
    ax = fig.subplots()
    labels = np.array(["(none)" if v is None else str(v) for v in m.labels], dtype=object)
    classes = sorted(set(labels))
    codes = np.searchsorted(np.array(classes, dtype=object), labels)
    cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"
    points = ax.scatter(m.xy[:, 0], m.xy[:, 1], c=codes, cmap=cmap, s=max(1.0, 30 / np.sqrt(len(m.xy) / 100 + 1)),
                        alpha=0.8, linewidths=0)
    if len(classes) <= 20:
        handles = [ax.scatter([], [], color=points.cmap(points.norm(i)), s=20, label=c) for i, c in enumerate(classes)]
        ax.legend(handles=handles, title="label", fontsize=7, loc="best", markerscale=1.2)
    if images is not None and Path(images).is_dir():
        rng = np.random.default_rng(m.params.seed)
        for row in rng.choice(len(m.ids), min(thumbnails, len(m.ids)), replace=False):
            try:
                pixels = np.asarray(thumbnail(Path(images) / str(m.ids[row]), 40))
            except Exception:  # a thumbnail that cannot be made is left out of the picture
                continue
            ax.add_artist(AnnotationBbox(OffsetImage(pixels, zoom=1.0), tuple(m.xy[row]), frameon=True, pad=0.1))
    ax.set_title(f"{title}: {m.params.method} map of {len(m.ids):,} rows", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return png(fig)
