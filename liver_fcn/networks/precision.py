"""The device and the numeric precision a network runs in: bf16 where the device has it natively, fp32 elsewhere."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from liver_fcn.errors import InputError, reported
from liver_fcn.options import flag

__all__ = ["Precision", "default_device", "native_bf16", "resolve_precision"]


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@reported
def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where the device has native bf16, else ``"fp32"``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


class Precision(torch.nn.Module):
    """Run a network in fp32 or under bf16 autocast, optionally in channels-last memory layout.

    MONAI's engines take ``amp`` for CUDA only; this wrapper works on CPUs and GPUs alike, for
    inference and for training (autocast's backward runs in the same precision; the weights, the
    optimizer and the loss stay float32). The output is always float32. Load weights into ``net``
    itself (the wrapper adds no parameters). ``precision="auto"`` picks bf16 where the device has
    it natively (:func:`native_bf16`).
    """

    def __init__(self, net: torch.nn.Module, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__()
        device = next(iter(net.parameters()), torch.empty(0)).device
        self.net, self.precision = net, resolve_precision(precision, device)
        self.channels_last = flag(channels_last, "channels_last")
        self.seconds = 0.0  # time spent in the network under no_grad (inference), for the run's summary
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timed = not torch.is_grad_enabled()  # inference: count the network's own time
        if timed:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = self.net(x)
        y = y.float()
        if timed:
            if y.device.type == "cuda":
                torch.cuda.synchronize(y.device)
            self.seconds += time.perf_counter() - t0
        return y


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where a GPU is present (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
