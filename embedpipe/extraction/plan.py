"""Planning: which device, precision, batch size, workers and threads a job runs with on
this machine, decided once from the config and the hardware."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..cluster import local_cores as cpu_count
from ..config import Device, ExtractConfig, Precision
from ..errors import DeviceError


@dataclass(frozen=True)
class Runtime:
    """How a job runs on this machine, decided once by :func:`plan`."""

    device: str
    precision: Precision
    batch_size: int
    workers: int
    threads: int
    channels_last: bool
    worker_nice: int

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value}



def bf16_supported_on_cpu() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def keep_fp32_exact() -> None:
    """Turn TF32 off for this process's CUDA convolutions and matmuls (a process-wide
    switch in PyTorch: an fp32 extraction owns its process's GPU arithmetic)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def plan(config: ExtractConfig) -> Runtime:
    """Choose device, batch size, workers and threads from the config and the machine."""
    cuda = torch.cuda.is_available()
    if config.device == Device.CUDA and not cuda:
        raise DeviceError(
            "--device cuda was asked for, but torch sees no CUDA device; use --device cpu "
            "(or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    device = "cuda" if config.device == Device.CUDA or (config.device == Device.AUTO and cuda) else "cpu"
    cores = cpu_count()
    if device == "cpu":
        if config.precision == Precision.FP16:
            raise DeviceError("fp16 autocast is for GPUs; on the CPU use --precision bf16")
        if config.precision == Precision.BF16 and not bf16_supported_on_cpu():
            raise DeviceError("this CPU has no bf16 support (AVX512-BF16/AMX); use fp32")
        return Runtime(
            device=device,
            precision=config.precision,
            # oneDNN on this class of CPU runs ResNets fastest at batch 8 (15.7 vs 10.7
            # images/s for resnet50 fp32 at 32; benchmarks/extract.py and docs/guide.md)
            batch_size=config.batch_size or 8,
            # The forward pass takes every core; low-priority decoders fill the gaps it
            # leaves instead of preempting it, and sleep when the prefetch window is full.
            workers=config.workers or min(cores, 8),
            threads=cores,
            # oneDNN runs convolutions faster in NHWC: 45 vs 31 images/s for EfficientNet-Lite0
            # and 40 vs 29 for resnet18 at batch 8 in fp32, the same vectors up to float32
            # rounding (max relative difference 1.4e-6)
            channels_last=True,
            worker_nice=10,
        )
    if config.precision == Precision.BF16 and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU has no bf16 support (it needs compute capability 8.0+); use fp16")
    if config.precision == Precision.FP32:
        # fp32 means fp32: PyTorch lets cuDNN convolutions (and may let matmuls) run in TF32
        # on Ampere and newer GPUs, 10-bit mantissas that move embeddings off torchvision's
        keep_fp32_exact()
    return Runtime(
        device=device,
        precision=config.precision,
        batch_size=config.batch_size or 128,
        workers=config.workers or max(1, min(cores - 1, 16)),
        threads=max(1, min(cores, 4)),
        channels_last=True,
        worker_nice=0,
    )
