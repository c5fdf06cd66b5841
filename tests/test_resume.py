"""kill -9 at several points, then the same command again: one row per image, no holes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from embedpipe.store import _Journal, list_parts, read_embeddings, sidecar

N = 36


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N):
        make_image(root / ("a" if i % 2 else "b") / f"{i:03d}.jpg", size=(120, 90), seed=i)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


def command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "embedpipe", "-q", "extract", str(src), "--backbone", "resnet18",
            "--weights", "none", "--out", str(out), "--batch-size", "2", "--workers", "1",
            "--part-rows", "8", "--decode", "full", "--resize-size", "72", "--crop-size", "64"]


def journal_rows(out: Path) -> int:
    return sum((t.num_rows if t is not None else 0)
               for t in map(_Journal.recover, (sidecar(out) / "journal" / "embeddings").glob("*.arrows")))


# (name, condition on the output folder at which the job is killed)
KILL_POINTS = {
    "before_any_output": lambda out: (sidecar(out) / "lock").exists(),
    "mid_journal": lambda out: (sidecar(out) / "journal" / "embeddings").is_dir() and journal_rows(out) >= 4,
    "after_first_part": lambda out: len(list_parts(out)) >= 1 if out.is_dir() else False,
    "after_two_parts": lambda out: len(list_parts(out)) >= 2 if out.is_dir() else False,
}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "emb"
    subprocess.run(command(corpus, out), check=True, capture_output=True)
    e = read_embeddings(out)
    return dict(zip(e.ids, e.vectors))


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_and_resume(corpus, reference, tmp_path, point):
    out = tmp_path / "emb"
    proc = subprocess.Popen(command(corpus, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reached = False
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if KILL_POINTS[point](out):
            proc.send_signal(signal.SIGKILL)
            reached = True
            break
        time.sleep(0.005)
    proc.wait()
    assert reached, f"the job ended before reaching {point}: {proc.stderr.read().decode()[-2000:]}"

    done = subprocess.run(command(corpus, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    e = read_embeddings(out)  # validates: unique ids, no NaN, consistent parts
    assert sorted(e.ids) == sorted(reference)  # every readable image exactly once
    for i, v in zip(e.ids, e.vectors):
        np.testing.assert_allclose(v, reference[i], rtol=1e-5, atol=1e-6)
    assert not list((sidecar(out) / "journal" / "embeddings").glob("*.arrows"))
