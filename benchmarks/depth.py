"""What every stage's embedding costs: ``--layer stages`` against ``gap`` and against one pass per stage.

    python benchmarks/depth.py                                    # resnet18 and resnet50, 200 photos
    python benchmarks/depth.py --models resnet18 --images 8 --repeats 1 --crop-size 64   # smoke

On the same folder of realistic JPEG photos (``benchmarks/extract.py``'s), end to end
(folder -> Parquet, model loading excluded), with random-init weights, medians of
``--repeats``:

* ``gap``: the usual embedding, one dataset;
* ``stages``: every stage's pooled output from one forward pass, a dataset each;
* ``per stage``: what a user without ``--layer stages`` would run: one extraction per
  stage (``--layer layer1``, then ``layer2``, ...), summed.

``stages / gap`` says what the extra pooling and writing cost; ``per stage / stages`` what
one pass saves. Run it alone: on 2 cores any other busy process distorts it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from extract import CACHE, end_to_end, make_photos

from embedpipe.backbones.stages import stage_embedder
from embedpipe.config import Precision


def rate(model: str, src: Path, repeats: int, **options) -> float:
    """Median images/s of ``repeats`` end-to-end runs (model loading excluded)."""
    return statistics.median(end_to_end(model, Precision.FP32, src, **options)[0] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the engine's CPU default")
    ap.add_argument("--crop-size", type=int, help="smaller inputs for a smoke run (default: the weights')")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = make_photos(CACHE / f"photos-{args.images}", args.images) if args.crop_size is None else \
            make_photos(Path(tmp) / "photos", args.images)
        size = {"crop_size": args.crop_size, "resize_size": args.crop_size} if args.crop_size else {}
        common = {"batch_size": args.batch_size, **size}
        rows = []
        for model in args.models.split(","):
            stages = _stage_names(model, args.crop_size)
            gap = rate(model, src, args.repeats, **common)
            every = rate(model, src, args.repeats, stages=("stages",), **common)
            one_by_one = [rate(model, src, args.repeats, stages=(s,), **common) for s in stages]
            # a run per stage: the time is the sum of each run's time per image
            per_stage = 1 / sum(1 / r for r in one_by_one)
            rows.append({"model": model, "stages": stages, "gap_images_per_s": gap,
                         "stages_images_per_s": every, "per_stage_images_per_s": per_stage,
                         "stages_over_gap": every / gap, "stages_over_per_stage": every / per_stage})
    print(f"{'model':<10} {'gap img/s':>10} {'stages img/s':>13} {'per stage':>10} "
          f"{'stages/gap':>11} {'stages/per stage':>17}")
    for r in rows:
        print(f"{r['model']:<10} {r['gap_images_per_s']:>10.1f} {r['stages_images_per_s']:>13.1f} "
              f"{r['per_stage_images_per_s']:>10.1f} {r['stages_over_gap']:>11.2f} "
              f"{r['stages_over_per_stage']:>17.2f}")
    if args.json:
        args.json.write_text(json.dumps({"images": args.images, "repeats": args.repeats, "rows": rows}, indent=2))


def _stage_names(model: str, crop_size: int | None) -> list[str]:
    """The stage names ``--layer stages`` extracts for ``model``, shallowest first."""
    return list(stage_embedder(model, weights="none", input_size=crop_size).stages)


if __name__ == "__main__":
    main()
