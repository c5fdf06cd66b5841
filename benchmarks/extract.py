"""Extraction throughput and memory, side by side in one run.

    python benchmarks/extract.py                      # the full run quoted in the docs
    python benchmarks/extract.py --images 64 --repeats 1 --rss-sizes 100,400   # a smoke run

Makes a folder of realistic JPEG photos (real photographs from scikit-image and
scikit-learn, rescaled to 500x375 ... 1600x1200, quality 90) and prints, for each model
and precision at 224 px with random-init weights:

1. pure forward throughput: uint8 batches already in memory, same batch size, precision
   and memory format as the engine (the ceiling);
2. embedpipe end to end, folder -> Parquet (model loading excluded, reported apart);
3. the naive baseline: a per-image PIL open -> weights.transforms() -> model loop;
4. the ratios 2/1 and 2/3;

and the peak RSS of the whole process tree (main + decode workers) of an end-to-end run
at two dataset sizes. Run it alone: on 2 cores any other busy process distorts it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from embedpipe.backbones import load_backbone
from embedpipe.config import ExtractConfig, Precision
from embedpipe.images.samples import photo_folder
from embedpipe.extraction.forward import BatchEmbedder
from embedpipe.extraction.plan import bf16_supported_on_cpu, cpu_count, plan
from embedpipe.extraction import extract

CACHE = Path(os.environ.get("EMBEDPIPE_BENCH_CACHE", Path(__file__).parent / ".cache"))


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs of mixed sizes made from real photographs (cached between runs)."""
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(n):
        return root
    bases = [Image.open(p).convert("RGB") for p in sorted(photo_folder(CACHE / "photos").glob("*.jpg"))]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = bases[i % len(bases)]
        long_side = int(rng.uniform(500, 1600))
        w, h = (long_side, long_side * 3 // 4) if rng.random() < 0.7 else (long_side * 3 // 4, long_side)
        img = base.resize((w, h), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(root / f"{i:05d}.jpg", quality=90)
    marker.write_text(str(n))
    return root


def pure_forward(model: str, precision: Precision, batch: int, n: int) -> float:
    """Images/s of the engine's forward on uint8 batches already in memory."""
    import torch

    cfg = ExtractConfig(source=".", out=".", backbone=model, weights="none", precision=precision, batch_size=batch)
    runtime = plan(cfg)
    torch.set_num_threads(runtime.threads)
    forward = BatchEmbedder(load_backbone(model, weights="none"), runtime)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    forward(pixels)  # warm-up: oneDNN picks its kernels on the first call
    steps = max(1, n // batch)
    t = time.perf_counter()
    for _ in range(steps):
        forward(pixels)
    return steps * batch / (time.perf_counter() - t)


def end_to_end(model: str, precision: Precision, src: Path, **options) -> tuple[float, float, dict]:
    """(images/s excluding model loading, load seconds, stage seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(source=src, out=Path(tmp) / "emb", backbone=model, weights="none",
                            precision=precision, **options)
        s = extract(cfg)
    run = s.seconds["total"] - s.seconds["load"]
    return s.embedded / run, s.seconds["load"], s.seconds


def naive(model: str, precision: Precision, src: Path, n: int) -> float:
    """The tutorial loop: one image at a time through PIL, transforms and the model."""
    import torch
    from torchvision.models import get_model, get_model_weights

    torch.set_num_threads(cpu_count())
    net = get_model(model, weights=None).eval()
    transform = get_model_weights(model).DEFAULT.transforms()
    files = sorted(src.glob("*.jpg"))[:n]
    dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=precision != Precision.FP32):
        net(transform(Image.open(files[0]).convert("RGB"))[None])
        t = time.perf_counter()
        for f in files:
            net(transform(Image.open(f).convert("RGB"))[None])
    return len(files) / (time.perf_counter() - t)


_RSS_CHILD = """
import sys
from embedpipe.config import ExtractConfig
from embedpipe.extraction import extract
extract(ExtractConfig(source=sys.argv[1], out=sys.argv[2], backbone=sys.argv[3], weights="none",
                      precision=sys.argv[4]))
"""


def peak_rss(model: str, precision: Precision, src: Path) -> float:
    """Peak summed RSS (MiB) of an end-to-end run's process tree, sampled every 50 ms."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(src), f"{tmp}/emb", model, precision.value])
        p = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                tree = [p, *p.children(recursive=True)]
                peak = max(peak, sum(q.memory_info().rss for q in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.05)
        if proc.returncode:
            raise RuntimeError(f"end-to-end run failed with exit code {proc.returncode}")
    return peak / 2**20


def embedding_agreement(src: Path, backbone: str, weights: str) -> dict[str, tuple[float, float]]:
    """Mean and minimum cosine similarity of each fast path's embeddings to the exact
    ones (fp32, full decode) for the same images: what each speed-up costs."""
    def run(**options) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(source=src, out=Path(tmp) / "emb", backbone=backbone, weights=weights, **options)
            extract(cfg)
            from embedpipe.store import read_embeddings

            return read_embeddings(cfg.out).vectors

    def cosine(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return float(c.mean()), float(c.min())

    exact = run(decode="full")
    out = {"draft decode": cosine(run(decode="draft"), exact),
           "device decode": cosine(run(decode="device"), exact)}
    if bf16_supported_on_cpu():
        out["bf16 (full decode)"] = cosine(run(decode="full", precision="bf16"), exact)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="images per throughput run")
    ap.add_argument("--naive-images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (medians reported)")
    ap.add_argument("--models", default="resnet50,resnet18")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch-size", type=int, default=8, help="the engine's CPU default")
    ap.add_argument("--rss-sizes", default="1000,8000", help="dataset sizes for the peak-RSS runs")
    ap.add_argument("--rss-model", default="resnet18")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--agreement-images", type=int, default=200,
                    help="images for the embedding-agreement table (0: skip)")
    ap.add_argument("--agreement-backbone", default="efficientnet_lite0",
                    help="real pretrained weights make the comparison meaningful")
    args = ap.parse_args()

    precisions = [Precision(p) for p in args.precisions.split(",")]
    if Precision.BF16 in precisions and not bf16_supported_on_cpu():
        print("this CPU has no bf16 support: skipping bf16")
        precisions.remove(Precision.BF16)
    src = make_photos(CACHE / f"photos-{args.images}", args.images)
    print(f"{cpu_count()} cores; {args.images} JPEGs (500x375..1600x1200, q90); batch {args.batch_size}; "
          f"medians of {args.repeats}\n")
    results = []
    header = f"{'model':<10}{'prec':<6}{'forward':>9}{'e2e':>9}{'naive':>9}{'e2e/fwd':>9}{'e2e/naive':>10}{'load s':>8}  stages (s)"
    print(header)
    for model in args.models.split(","):
        for precision in precisions:
            med = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
            fwd = med(lambda: pure_forward(model, precision, args.batch_size, args.images))
            runs = [end_to_end(model, precision, src, batch_size=args.batch_size) for _ in range(args.repeats)]
            e2e = statistics.median(r[0] for r in runs)
            load = statistics.median(r[1] for r in runs)
            stages = {k: round(v, 1) for k, v in runs[len(runs) // 2][2].items()}
            nv = med(lambda: naive(model, precision, src, args.naive_images))
            row = dict(model=model, precision=precision.value, forward=fwd, e2e=e2e, naive=nv,
                       e2e_over_forward=e2e / fwd, e2e_over_naive=e2e / nv, load_s=load, stages=stages)
            results.append(row)
            print(f"{model:<10}{precision.value:<6}{fwd:>9.1f}{e2e:>9.1f}{nv:>9.1f}{e2e / fwd:>9.2f}"
                  f"{e2e / nv:>10.2f}{load:>8.1f}  {stages}", flush=True)

    rss_precision = Precision.BF16 if Precision.BF16 in precisions else Precision.FP32
    sizes = [int(s) for s in args.rss_sizes.split(",")]
    rss = {n: peak_rss(args.rss_model, rss_precision, make_photos(CACHE / f"photos-{n}", n)) for n in sizes}
    print(f"\npeak RSS, {args.rss_model} {rss_precision.value} end to end (main + workers): "
          + ", ".join(f"{n} images {v:.0f} MiB" for n, v in rss.items())
          + f"; ratio {rss[sizes[-1]] / rss[sizes[0]]:.3f}")
    agreement = {}
    if args.agreement_images:
        src = make_photos(CACHE / f"photos-{args.agreement_images}", args.agreement_images)
        agreement = embedding_agreement(src, args.agreement_backbone, "DEFAULT")
        print(f"\ncosine similarity to fp32 + full decode, {args.agreement_backbone} pretrained, "
              f"{args.agreement_images} photos (mean / min):")
        for name, (mean, low) in agreement.items():
            print(f"  {name:<20} {mean:.5f} / {low:.5f}")
    if args.json:
        args.json.write_text(json.dumps({"throughput": results, "peak_rss_mib": rss,
                                         "agreement": agreement}, indent=2))


if __name__ == "__main__":
    main()
