"""Does an HNSW graph's tuned recall hold for fresh queries? Tuned figure against fresh
query sets, build by build.

    python benchmarks/hnsw_tuning.py                        # 200,000 x 512, 3 builds, ~4 min
    python benchmarks/hnsw_tuning.py --rows 20000 --builds 1   # smoke

Each build draws a clustered collection (``benchmarks/index.py``'s generator), builds
``HNSW32`` with ``embedpipe`` at recall@10 target 0.95, then searches ``--sets`` fresh
query sets of 1,000 drawn from the same clusters at the tuned efSearch. Printed per build:
the tuned efSearch, the recall tuning measured (and on how many held-out queries), each
fresh set's recall@10 and their mean. ``--tune-queries`` overrides how many queries a
graph tunes on (embedpipe's ``GRAPH_TUNE_QUERIES``), to compare. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import POINTS_PER_CENTRE, Clusters, blocks, clustered  # noqa: E402

from embedpipe.index import Index  # noqa: E402
from embedpipe.index import plan as planning  # noqa: E402

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--builds", type=int, default=3, help="collections (seeds) to build")
    parser.add_argument("--sets", type=int, default=6, help="fresh 1,000-query sets per build")
    parser.add_argument("--tune-queries", type=int, help="override GRAPH_TUNE_QUERIES")
    parser.add_argument("--target-recall", type=float, default=0.95)
    args = parser.parse_args()
    if args.tune_queries:
        planning.GRAPH_TUNE_QUERIES = args.tune_queries

    print(f"HNSW32, {args.rows:,} x {args.dim} clustered, target recall@{K} {args.target_recall}, "
          f"graphs tune on {planning.GRAPH_TUNE_QUERIES} held-out queries (or a tenth of the rows)")
    below = 0
    for seed in range(args.builds):
        rng = np.random.default_rng(seed)
        clusters = Clusters.draw(max(8, args.rows // POINTS_PER_CENTRE), args.dim, rng)
        x = clustered(args.rows, clusters, rng)
        index = Index.build(lambda: iter(blocks(x)), index="HNSW32", target_recall=args.target_recall)
        faiss.normalize_L2(x)
        exact = faiss.IndexFlatIP(args.dim)
        exact.add(x)
        recalls = []
        for _ in range(args.sets):
            q = clustered(1000, clusters, rng)
            truth = exact.search(q / np.linalg.norm(q, axis=1, keepdims=True), K)[1]
            found = index.search(q, K).id.astype(np.int64).reshape(len(q), K)
            recalls.append(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])))
        t = index.info.tuning
        mean = statistics.fmean(recalls)
        below += mean < args.target_recall
        print(f"build {seed}: efSearch {t.value}, tuned recall {t.recall:.4f} (95% low {t.recall_low:.4f}, "
              f"{t.n_queries} queries); fresh sets {' '.join(f'{r:.3f}' for r in recalls)}; "
              f"mean {mean:.4f} ({mean - t.recall:+.4f})")
    print(f"{below} of {args.builds} builds below the target on fresh queries")


if __name__ == "__main__":
    main()
