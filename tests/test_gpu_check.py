"""benchmarks/gpu_check.py in its CPU smoke mode: every section runs, and the report says
that no GPU figure was measured."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("exactness", "precision", "decode", "throughput", "memory")
NO_GPU_NOTE = "no CUDA device: CPU smoke run, no GPU figures were measured"


def run_check(tmp: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """The script on the CPU (CUDA hidden, photos cached under ``tmp``) and its JSON."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "EMBEDPIPE_BENCH_CACHE": str(tmp / "cache")}
    out = tmp / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    proc, report = run_check(tmp_path_factory.mktemp("gpu_check"))
    return proc.stdout, report


@pytest.mark.slow  # ~45 s on 2 cores: a dozen model builds and eight extractions
class TestSmokeRun:
    """One run of the script, as `python benchmarks/gpu_check.py --out gpu.json` without CUDA."""

    def test_says_no_gpu_was_measured(self, smoke):
        stdout, report = smoke
        assert report["gpu"] is None
        assert report["note"] == NO_GPU_NOTE
        assert NO_GPU_NOTE in stdout.splitlines()[0]
        assert report["date"] and report["torch"]

    def test_every_section_ran_with_figures(self, smoke):
        _, report = smoke
        assert list(report["sections"]) == list(SECTIONS)
        for name, section in report["sections"].items():
            assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
            assert section["rows"], name

    def test_exactness_cpu_against_cpu(self, smoke):
        section = smoke[1]["sections"]["exactness"]
        compared = {(r["model"], r["layer"]) for r in section["rows"]}
        assert compared >= {("lenet5", "gap"), ("lenet5", "penultimate")}
        assert all(r["min_cosine"] >= 0.99999 for r in section["rows"])
        assert section["passed"] and section["min_cosine_tf32"] is None  # TF32 is a GPU thing

    def test_precision_figures_or_reasons(self, smoke):
        rows = {r["precision"]: r for r in smoke[1]["sections"]["precision"]["rows"]}
        assert "GPUs" in rows["fp16"]["skipped"]  # the engine refuses fp16 on the CPU
        assert rows["bf16"].get("skipped") or rows["bf16"]["mean_cosine"] > 0.99

    def test_decode_applies_each_orientation(self, smoke):
        section = smoke[1]["sections"]["decode"]
        assert section["orientation_ok"]
        assert {r["tag"] for r in section["rows"]} == {1, 3, 6, 8}
        assert all(r["applied"] == r["closest"] == r["tag"] for r in section["rows"])
        assert section["min_cosine"] > 0.999

    def test_throughput_and_memory_ran_every_path(self, smoke):
        sections = smoke[1]["sections"]
        runs = {(r["model"], r["decode"]) for r in sections["throughput"]["rows"]}
        assert runs == {(m, d) for m in ("resnet50", "resnet18") for d in ("full", "device")}
        for row in sections["throughput"]["rows"]:
            assert row["embedded"] == 8 and row["images_per_s"] > 0 and row["gpu_util"] == "n/a"
            assert row["limit"] in ("decode_wait", "forward", "write")
        assert sections["throughput"]["passed"] is None  # the 0.8x target is judged on a GPU only
        memory = sections["memory"]
        assert [r["batch"] for r in memory["rows"]] == [2, 4] and memory["largest_fitting"] == 4
        assert all(r["peak_mib"] is None for r in memory["rows"])


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (it imports benchmarks/extract.py from its own folder)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def a_check(gpu_check, tmp_path: Path, budget_s: float):
    """A smoke run's Check without photos, its clock started now."""
    return gpu_check.Check("cpu", gpu_check.QUICK, None, "not made in this test", tmp_path,
                           gpu_check.Budget(budget_s))


def test_a_spent_budget_skips_the_section_with_a_note(gpu_check, tmp_path):
    result = gpu_check.run_section("exactness", a_check(gpu_check, tmp_path, 0))
    assert result["status"] == "skipped" and "--budget-s" in result["reason"]


def test_a_failing_section_records_its_error(gpu_check, tmp_path, monkeypatch):
    check = a_check(gpu_check, tmp_path, 60)
    monkeypatch.setitem(gpu_check.SECTIONS, "memory", lambda check: {"rows": check.photos})
    result = gpu_check.run_section("memory", check)
    assert result["status"] == "error"
    assert result["error"] == "RuntimeError: the photos could not be made: not made in this test"
