"""benchmarks/scale.py at smoke sizes: every figure is measured, the re-run of a finished
dataset embeds nothing, the incremental one exactly the new images, and afterwards the
added images and their rows are gone again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embedpipe.store import dataset_info

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "scale.py"
SIZES = (200,)
ADDED = 10


def run_scale(work: Path, out: Path, layout: str) -> subprocess.CompletedProcess:
    # the working tree's embedpipe, in the script's CLI runs too
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--layout", layout, "--sizes", ",".join(map(str, SIZES)), "--repeats", "1",
         "--added", str(ADDED), "--work", str(work), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # ~20 s a layout on 2 cores: each of its CLI runs imports torch
@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_smoke_run_measures_every_figure(tmp_path, layout):
    proc = run_scale(tmp_path / "work", tmp_path / "scale.json", layout)
    report = json.loads((tmp_path / "scale.json").read_text())
    assert report["baseline"]["images"] == 100 and report["baseline"]["noop_rss_mib"] > 0
    assert [r["images"] for r in report["sizes"]] == list(SIZES)
    for row in report["sizes"]:
        for key in ("walk_s", "walk_rss_mib", "noop_s", "noop_rss_mib", "added_s", "added_rss_mib",
                    "added_images_per_s"):
            assert row[key] > 0, key
        assert (row["noop_embedded"], row["noop_skipped"]) == (0, row["images"])
        assert row["added_embedded"] == ADDED
        assert isinstance(row["noop_extra_over_walk"], float)
    assert report["derived"]["between"] == [100, *SIZES]  # one size: against the baseline
    assert set(report["targets"]) == {"bytes_per_image", "noop_extra_over_walk" if layout == "folder" else "noop_extra_s"}
    assert all(isinstance(t["pass"], bool) for t in report["targets"].values())
    assert "bytes_per_image" in proc.stdout and "smoke sizes" in report["note"]

    # the state after a run is the state before it: the added images and their rows are gone
    for n in SIZES:
        folder = tmp_path / "work" / f"{layout}-{n}"
        listed = sum(len(files) for _, _, files in os.walk(folder / ("images" if layout == "folder" else "shards")))
        assert listed == (n if layout == "folder" else min(100, n))
        assert dataset_info(folder / "emb")["rows"] == n
