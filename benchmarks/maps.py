"""What a map of a million embeddings costs: time and memory of each step of ``embedpipe map``.

    python benchmarks/maps.py                                     # 1,000,000 x 512, UMAP
    python benchmarks/maps.py --rows 3000 --dim 32 --method pca --exact-max-rows 1000   # smoke

Vectors are clustered like ``benchmarks/index.py``'s (a moderate intrinsic dimension, as CNN
embeddings have), labelled by cluster. Timed in this process, one run each:

* ``project``: the reducer, fitted on ``--fit-sample`` rows (UMAP or PCA; 50,000 by
  default, as ``embedpipe map``) and placing every row with ``transform``;
* ``neighbors``: each row's k nearest others (``embedpipe.neighbours.knn_graph``): exact up
  to ``EXACT_MAX_ROWS`` rows, an IVF index tuned to a measured recall above (its recall@k
  against brute force on 1,000 other rows is measured here too);
* ``write``: ``map.parquet``, ``map.json``, the reducer and ``map.png``;

and the peak RSS of the whole run, against the vectors' own size. Labels are arbitrary (they
only colour the PNG).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from index import Clusters, clustered

from embedpipe import neighbours
from embedpipe.config import MapMethod
from embedpipe.maps import EmbeddingMap, MapParams, project, write_map
from embedpipe.provenance import Provenance


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def neighbour_recall(x: np.ndarray, rows: np.ndarray, k: int, sample: int, rng) -> float:
    """recall@k of ``rows`` (n, k) against brute-force cosine on ``sample`` rows."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    picked = rng.choice(len(x), min(sample, len(x)), replace=False)
    hits = 0
    for start in range(0, len(picked), 100):
        q = picked[start : start + 100]
        sims = x[q] @ x.T
        sims[np.arange(len(q)), q] = -np.inf  # not itself
        truth = np.argpartition(-sims, k, axis=1)[:, :k]
        hits += sum(len(set(t) & set(r)) for t, r in zip(truth, rows[q]))
    return hits / (len(picked) * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--method", default="umap", choices=[m.value for m in MapMethod if m is not MapMethod.TSNE])
    ap.add_argument("--fit-sample", type=int, default=MapParams.fit_sample)
    ap.add_argument("--k", type=int, default=MapParams.k)
    ap.add_argument("--exact-max-rows", type=int, default=neighbours.EXACT_MAX_ROWS,
                    help="rows up to which neighbours are exact (the smoke run lowers it to reach IVF)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = Clusters.draw(args.clusters, args.dim, rng)
    x = clustered(args.rows, centres, rng)
    labels = (np.arange(args.rows) % 10).astype(str).astype(object)  # colours only: arbitrary
    ids = np.arange(args.rows).astype(str).astype(object)
    data_mib = x.nbytes / 2**20
    params = MapParams(method=args.method, fit_sample=args.fit_sample, k=args.k)
    steps = {}

    t = time.perf_counter()
    xy, reducer, notes = project(x, params)
    steps["project_s"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = neighbours.knn_graph(x, params.k, exact=args.rows <= args.exact_max_rows)
    steps["neighbors_s"] = time.perf_counter() - t
    rows = graph.neighbours
    recall = 1.0 if graph.exact else neighbour_recall(x, rows, min(params.k, args.rows - 1), 1000, rng)
    m = EmbeddingMap(ids, labels, xy, rows, graph.similarities, params, reducer,
                     {**notes, "neighbors": graph.describe()})
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_map(m, Path(tmp) / "map", provenance=Provenance(backbone="synthetic", layer="gap", dim=args.dim))
        steps["write_s"] = time.perf_counter() - t
    report = {
        "rows": args.rows, "dim": args.dim, "method": args.method, "fitted_rows": notes["fitted_rows"],
        **{k: round(v, 2) for k, v in steps.items()}, "total_s": round(sum(steps.values()), 2),
        "neighbors": graph.method, "tuned_recall": graph.recall, "neighbor_recall": round(recall, 4),
        "vectors_mib": round(data_mib, 1), "peak_rss_mib": round(peak_mib(), 1),
    }
    for key, value in report.items():
        print(f"{key:>16}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
