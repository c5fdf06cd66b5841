"""What an index build on Ray costs: the add pass in Ray tasks (one per Parquet part)
against the same build in one process, with each Ray worker's peak memory.

    python benchmarks/index_ray.py                       # 500,000 x 512 in 8 parts, IVF2048,SQ8
    python benchmarks/index_ray.py --rows 20000 --dim 32 --index IVF64,Flat   # smoke

The embeddings are written once as an embedpipe dataset of 65,536-row parts (clustered
like ``benchmarks/index.py``'s). Both builds scan and train in the driver; the local one
then adds every part itself, the Ray one in tasks (``--num-cpus`` local Ray workers).
Printed: wall time of each build and of its stages, add throughput per worker (rows/s),
the peak RSS of the driver and of the largest Ray worker, and whether both builds answer
1,000 queries identically. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from index import Clusters, clustered

from embedpipe.index import build_embeddings
from embedpipe.store import DatasetWriter, embeddings_schema, embeddings_table


def write_dataset(out: Path, x: np.ndarray, part_rows: int = 65_536) -> Path:
    meta = {"backbone": "synthetic", "dim": x.shape[1], "layer": "gap"}
    with DatasetWriter(out, meta, part_rows=part_rows) as w:
        for s in range(0, len(x), part_rows):
            m = min(part_rows, len(x) - s)
            w.append(embeddings_table(ids=[f"{i:09d}" for i in range(s, s + m)], labels=[None] * m,
                                      vectors=x[s : s + m], width=[1] * m, height=[1] * m, size=[1] * m,
                                      mtime_ns=[1] * m, content_hash=[None] * m,
                                      schema=embeddings_schema(x.shape[1])))
    return out


class WorkerMemory:
    """Peak RSS of Ray's worker processes, polled every 0.2 s while the build runs."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray::" in cmd and p.info["memory_info"] is not None:
                    self.peak = max(self.peak, p.info["memory_info"].rss)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--index", default="IVF2048,SQ8")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import ray

    rng = np.random.default_rng(0)
    clusters = Clusters.draw(max(8, args.rows // 300), args.dim, rng)
    x = clustered(args.rows, clusters, rng)
    queries = clustered(1000, clusters, rng)
    report: dict = {"rows": args.rows, "dim": args.dim, "index": args.index}
    with tempfile.TemporaryDirectory() as tmp:
        emb = write_dataset(Path(tmp) / "emb", x)
        del x
        report["parts"] = len(list(emb.glob("part-*.parquet")))
        results = {}
        stages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: r.getMessage().startswith("built ") and stages.append(r.getMessage().split(" in ", 1)[1])
        logging.getLogger("embedpipe.index").addHandler(handler)
        logging.getLogger("embedpipe.index").setLevel(logging.INFO)
        for engine in ("local", "ray"):
            if engine == "ray":
                ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
            t = time.perf_counter()
            with WorkerMemory() as workers:
                index = build_embeddings(emb, index=args.index, engine=engine)
            report[f"{engine}_s"] = round(time.perf_counter() - t, 1)
            report[f"{engine}_stages"] = stages.pop() if stages else "?"
            if engine == "ray":
                report["ray_worker_peak_rss_mib"] = round(workers.peak / 2**20)
                ray.shutdown()
            results[engine] = index.search(queries, 10)
            report[f"{engine}_tuning"] = str(index.info.tuning and index.info.tuning.value)
        report["driver_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        report["identical_results"] = bool(np.array_equal(results["local"].id, results["ray"].id))
    report["ray_over_local"] = round(report["ray_s"] / report["local_s"], 2)
    for key, value in report.items():
        print(f"{key:>24}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
