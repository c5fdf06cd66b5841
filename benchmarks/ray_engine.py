"""The Ray Data engine's overhead against the local engine, side by side in one run.

    python benchmarks/ray_engine.py                             # the run quoted in docs/ray.md
    python benchmarks/ray_engine.py --images 32,64 --repeats 1  # a smoke run

Same photos as benchmarks/extract.py (real photographs rescaled to 500x375 ... 1600x1200),
same model, precision and batch size, random-init weights. Runs alternate local / Ray so
that drift in the machine hits both. For each engine it prints the median of

- images/s over the run, excluding the driver's model load (the local engine's
  throughput; for Ray this includes starting the actors, which load their own model);
- the wall time of the whole call, and for Ray the time ``ray.init`` took once;
- the marginal images/s between the two dataset sizes, ``(n2 - n1) / (wall2 - wall1)``:
  the steady-state rate, with every fixed cost (actor start, model loads) cancelled.

The ratio Ray / local is the price of the engine on one machine; on a cluster the point is
that the Ray side scales with nodes (docs/ray.md). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from extract import CACHE, make_photos

from embedpipe.extraction import local as engine
from embedpipe.extraction import ray as ray_engine
from embedpipe.config import ExtractConfig
from embedpipe.extraction.plan import cpu_count


def run(extract, src: Path, **options) -> tuple[float, float]:
    """(images/s excluding the driver's model load, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        s = extract(ExtractConfig(source=src, out=Path(tmp) / "emb", weights="none", **options))
        wall = time.perf_counter() - t
    return s.embedded / (s.seconds["total"] - s.seconds["load"]), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="400,1000", help="two dataset sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import ray

    sizes = [int(n) for n in args.images.split(",")]
    srcs = {n: make_photos(CACHE / f"photos-{n}", n) for n in sizes}
    t = time.perf_counter()
    ray.init(num_cpus=cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - t
    common = dict(backbone=args.model, precision=args.precision, batch_size=args.batch_size)
    engines = {"local": (engine.extract, {}), "ray": (ray_engine.extract, {"engine": "ray"})}
    results = {f"{e}-{n}": [] for n in sizes for e in engines}
    for _ in range(args.repeats):
        for n in sizes:
            for e, (fn, extra) in engines.items():
                results[f"{e}-{n}"].append(run(fn, srcs[n], **common, **extra))
    ray.shutdown()

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in results.items()}
    print(f"{args.model} {args.precision}, batch {args.batch_size}, {cpu_count()} cores, photos "
          f"500x375-1600x1200, medians of {args.repeats}; ray.init took {ray_start:.1f} s once")
    print(f"{'engine':<8}{'images':>7}{'images/s':>10}{'wall s':>9}")
    for k, (ips, wall) in med.items():
        e, n = k.split("-")
        print(f"{e:<8}{n:>7}{ips:>10.1f}{wall:>9.1f}")
    n1, n2 = sizes[0], sizes[-1]
    marginal = {e: (n2 - n1) / (med[f"{e}-{n2}"][1] - med[f"{e}-{n1}"][1]) for e in engines}
    for n in sizes:
        print(f"ray / local throughput at {n} images: {med[f'ray-{n}'][0] / med[f'local-{n}'][0]:.2f}")
    print(f"marginal images/s {n1}->{n2}: local {marginal['local']:.1f}, ray {marginal['ray']:.1f} "
          f"(ratio {marginal['ray'] / marginal['local']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "medians": med, "marginal": marginal,
                                         "ray_init_s": ray_start}, indent=2))


if __name__ == "__main__":
    main()
