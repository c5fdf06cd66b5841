"""benchmarks/depth.py at a smoke size: each figure measured, the ratios derived from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow  # a dozen small extractions
def test_smoke_run_measures_gap_stages_and_one_pass_per_stage(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "depth.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "depth.py"), "--models", "resnet18", "--images", "8",
         "--repeats", "1", "--crop-size", "64", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["stages"] == ["layer1", "layer2", "layer3", "layer4"]
    assert min(row["gap_images_per_s"], row["stages_images_per_s"], row["per_stage_images_per_s"]) > 0
    assert row["stages_over_gap"] == pytest.approx(row["stages_images_per_s"] / row["gap_images_per_s"])
    assert "stages/gap" in proc.stdout
