"""How fast the CLI answers the commands people run all day, and how much memory it takes.

    python benchmarks/startup.py                 # the run quoted in the closing notes
    python benchmarks/startup.py --repeats 3     # a smoke run

Runs each command as its own process (``python -m embedpipe ...``, so interpreter start-up
is included) and reports the median wall time and the median peak RSS of that process
(GNU time's %M). Targets on the 2-core machine: under 0.5 s and 150 MB for
``--help`` and ``info DIR``. A bare ``python -c pass`` is measured beside them as the floor.
Run it alone: on 2 cores any other busy process distorts it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: GNU time (Debian's package `time`), which reports the peak RSS of the program it runs
TIME = "/usr/bin/time"


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one run of ``argv``.

    The RSS comes from GNU time run as a fresh program: a child forked from this Python
    would count this process's own pages, already resident at the fork, in its peak.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        t = time.perf_counter()
        r = subprocess.run([TIME, "-f", "%M", "-o", report.name, *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.decode()[-2000:]}")
        return wall, int(report.read().split()[-1]) / 1024  # KiB


def small_dataset(root: Path) -> Path:
    """A 1,000-row dataset written through the store, as extract writes one."""
    from embedpipe.store import DatasetWriter, embeddings_schema, embeddings_table

    meta = {"backbone": "lenet5", "family": "lenet", "source": "embedpipe", "layer": "gap", "dim": 120,
            "weights": {"kind": "none", "name": "none", "pretrained": False, "seed": 0},
            "preprocessing": {"resize_size": 32, "crop_size": 32, "mean": [0.1307], "std": [0.3081],
                              "interpolation": "bilinear", "channels": 1},
            "precision": "fp32", "decode": "full", "embedding_dtype": "float32", "normalize": False}
    rng = np.random.default_rng(0)
    with DatasetWriter(root / "emb", meta) as w:
        n = 1000
        w.append(embeddings_table(
            ids=[f"{i:05d}.png" for i in range(n)], labels=[str(i % 10) for i in range(n)],
            vectors=rng.standard_normal((n, 120)).astype(np.float32), width=[28] * n, height=[28] * n,
            size=[100] * n, mtime_ns=[0] * n, content_hash=[""] * n, schema=embeddings_schema(120),
        ))
    return root / "emb"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        emb = small_dataset(Path(tmp))
        py = [sys.executable]
        cases = {
            "python -c pass (floor)": [*py, "-c", "pass"],
            "embedpipe --help": [*py, "-m", "embedpipe", "--help"],
            "embedpipe info DIR": [*py, "-m", "embedpipe", "info", str(emb)],
            "embedpipe backbones --help": [*py, "-m", "embedpipe", "backbones", "--help"],
            "embedpipe index info --help": [*py, "-m", "embedpipe", "index", "info", "--help"],
        }
        rows = {}
        for name, argv in cases.items():
            measure(argv)  # warm the page cache
            runs = [measure(argv) for _ in range(args.repeats)]
            rows[name] = {
                "median_s": round(statistics.median(w for w, _ in runs), 3),
                "median_rss_mib": round(statistics.median(r for _, r in runs), 1),
            }
    print(f"{'command':<30} {'median s':>9} {'peak RSS MiB':>13}   ({args.repeats} runs each)")
    for name, r in rows.items():
        print(f"{name:<30} {r['median_s']:>9.3f} {r['median_rss_mib']:>13.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
