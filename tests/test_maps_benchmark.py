"""benchmarks/maps.py at a smoke size, through the IVF neighbours path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_smoke_run_times_every_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "maps.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "maps.py"), "--rows", "3000", "--dim", "32", "--method",
         "pca", "--fit-sample", "1000", "--exact-max-rows", "1000", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["rows"], r["fitted_rows"], r["neighbors"]) == (3000, 1000, "IVF64,Flat nprobe 8")
    assert min(r["project_s"], r["neighbors_s"], r["write_s"], r["peak_rss_mib"]) > 0
    assert r["tuned_recall"] >= 0.98 and abs(r["neighbor_recall"] - r["tuned_recall"]) < 0.03
