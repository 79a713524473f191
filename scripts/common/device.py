"""Device habits shared by training, evaluation and benchmarks: bf16 autocast on CUDA, and honest timing."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, dtype: str):
    """Autocast to `dtype` on CUDA; CPU runs float32 (CPU autocast is slower there and changes nothing we need)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall clock read after it measures the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
