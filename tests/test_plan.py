"""How a job is planned on this machine, and on a (simulated) CUDA one."""

from __future__ import annotations

import pytest
import torch

from embedpipe.config import ExtractConfig
from embedpipe.errors import DeviceError
from embedpipe.extraction.plan import bf16_supported_on_cpu, plan


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig(source=".", out=".", backbone="resnet18", **kw)


@pytest.mark.parametrize(
    "cores, workers, threads",
    [(1, 1, 1), (2, 2, 2), (8, 8, 8), (32, 8, 32)],  # decoders: one per core, at most 8
)
def test_cpu_defaults_keep_fp32_exact(monkeypatch, cores, workers, threads):
    import embedpipe.extraction.plan as planning

    monkeypatch.setattr(planning, "cpu_count", lambda: cores)
    r = plan(cfg(device="cpu"))
    assert (r.device, r.precision, r.channels_last) == ("cpu", "fp32", True)
    assert (r.workers, r.threads, r.batch_size) == (workers, threads, 8)
    assert r.worker_nice > 0  # decoders yield to the forward pass


def test_user_choices_win():
    r = plan(cfg(device="cpu", batch_size=7, workers=3))
    assert (r.batch_size, r.workers) == (7, 3)


@pytest.mark.skipif(not bf16_supported_on_cpu(), reason="this CPU has no bf16")
def test_bf16_on_cpu_uses_channels_last():
    assert plan(cfg(device="cpu", precision="bf16")).channels_last


def test_fp16_on_cpu_is_refused():
    with pytest.raises(DeviceError, match="use --precision bf16"):
        plan(cfg(device="cpu", precision="fp16"))


def test_cuda_asked_for_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        plan(cfg(device="cuda"))
    assert plan(cfg(device="auto")).device == "cpu"


@pytest.mark.parametrize(
    "cores, workers, threads",
    [(1, 1, 1), (2, 1, 2), (16, 15, 4), (64, 16, 4)],  # a core for the main loop, 16 at most
)
def test_auto_picks_cuda_when_present(monkeypatch, cores, workers, threads):
    import embedpipe.extraction.plan as planning

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(planning, "cpu_count", lambda: cores)
    r = plan(cfg(precision="fp16"))
    assert (r.device, r.channels_last, r.batch_size) == ("cuda", True, 128)
    assert (r.workers, r.threads, r.worker_nice) == (workers, threads, 0)


def test_fp32_on_cuda_turns_tf32_off(monkeypatch):
    """The path a GPU takes, forced on the CPU: fp32 must not quietly run in TF32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert plan(cfg(precision="fp32")).device == "cuda"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(DeviceError, match="no bf16 support.*use fp16"):
        plan(cfg(precision="bf16"))
