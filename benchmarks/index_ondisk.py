"""What keeping an IVF index's inverted lists on disk costs and saves: one build in
memory, one with ``lists_dir`` (``index build --on-disk``), each in a fresh process.

    python benchmarks/index_ondisk.py                        # 1,000,000 x 512, IVF4096,Flat
    python benchmarks/index_ondisk.py --rows 20000 --dim 32 --index IVF64,Flat   # smoke

The embeddings are written once as an embedpipe dataset (clustered like
``benchmarks/index.py``'s). For each build: wall time, the build's peak RSS and peak
anonymous memory (RssAnon sampled every 50 ms: RSS also counts the pages of files the
build memory-maps, which the kernel can drop under pressure), and then in
another fresh process the index opened and searched with 1,000 queries at the tuned
setting (warm: the page cache holds what the queries touched): open time, anonymous memory
after opening (RssAnon: the process's own, not page cache), median QPS of 3 searches, and
whether both indexes answer identically. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import BLOCK_ROWS, POINTS_PER_CENTRE, Clusters, clustered  # noqa: E402

BUILD = """
import json, resource, sys, threading, time
from embedpipe.index import build_embeddings
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak, done = [0.0], threading.Event()
def sample():  # RssAnon: the process's own memory; mapped files' pages are the kernel's to drop
    while not done.wait(0.05):
        peak[0] = max(peak[0], anon_mb())
threading.Thread(target=sample, daemon=True).start()
emb, out, spec, lists = sys.argv[1:5]
t = time.perf_counter()
index = build_embeddings(emb, index=spec, lists_dir=lists or None)
index.save(out)
done.set()
print(json.dumps({"build_s": time.perf_counter() - t, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_anon_mb": peak[0], "factory": index.info.factory,
    "setting": index.info.tuning.value, "reason": index.info.reason}))
"""

SEARCH = """
import json, statistics, sys, time
import numpy as np
from embedpipe.index import Index
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
before = anon_mb()
t = time.perf_counter()
index = Index.open(sys.argv[1])
opened = time.perf_counter() - t
after_open = anon_mb()
q = np.load(sys.argv[2])
index.search(q, 10)  # warm the page cache
times = []
for _ in range(3):
    t = time.perf_counter()
    found = index.search(q, 10)
    times.append(time.perf_counter() - t)
np.save(sys.argv[3], found.id.astype(str))
print(json.dumps({"open_s": opened, "open_anon_mb": after_open - before,
                  "qps": len(q) / statistics.median(times), "anon_mb_after_search": anon_mb() - before}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index", default="IVF4096,Flat")
    args = parser.parse_args()
    from embedpipe.store import DatasetWriter, embeddings_schema, embeddings_table

    rng = np.random.default_rng(0)
    clusters = Clusters.draw(max(8, args.rows // POINTS_PER_CENTRE), args.dim, rng)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emb = tmp / "emb"
        with DatasetWriter(emb, {"backbone": "synthetic", "dim": args.dim, "layer": "gap"}) as w:
            for s in range(0, args.rows, BLOCK_ROWS):
                m = min(BLOCK_ROWS, args.rows - s)
                w.append(embeddings_table(
                    ids=[f"{i:09d}" for i in range(s, s + m)], labels=[None] * m,
                    vectors=clustered(m, clusters, rng), width=[1] * m, height=[1] * m, size=[1] * m,
                    mtime_ns=[1] * m, content_hash=[None] * m, schema=embeddings_schema(args.dim)))
        np.save(tmp / "q.npy", clustered(1000, clusters, rng))
        print(f"{args.rows:,} x {args.dim}, {args.index}, 1,000 queries")
        found = {}
        for name, lists in (("in memory", ""), ("lists on disk", str(tmp / "lists"))):
            built = run(BUILD, str(emb), str(tmp / name), args.index, lists)
            searched = run(SEARCH, str(tmp / name), str(tmp / "q.npy"), str(tmp / f"{name}.npy"))
            found[name] = np.load(tmp / f"{name}.npy")
            files = {p.name: p.stat().st_size for p in (tmp / name).iterdir()}
            print(f"{name:>14}: build {built['build_s']:.1f} s, peak RSS {built['peak_rss_mb']:,.0f} MB "
                  f"(anonymous {built['peak_anon_mb']:,.0f} MB); "
                  f"{built['factory']} at {built['setting']}; files "
                  + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in sorted(files.items()))
                  + f"; open {searched['open_s']:.2f} s, +{searched['open_anon_mb']:,.0f} MB anonymous "
                  f"after opening, {searched['anon_mb_after_search']:,.0f} MB after searching; "
                  f"{searched['qps']:,.0f} QPS")
        same = np.array_equal(found["in memory"], found["lists on disk"])
        print(f"identical answers: {same}")


if __name__ == "__main__":
    main()
