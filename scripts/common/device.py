"""Device habits shared by training, evaluation and benchmarks: bf16 autocast on CUDA, honest timing, and
torch.compile with an eager way out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from model.errors import NanoLladaError


def autocast(device: torch.device, dtype: str):
    """Autocast to `dtype` on CUDA; CPU runs float32 (CPU autocast is slower there and changes nothing we need)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall clock read after it measures the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """torch.compile with static shapes: a graph per distinct input shape (a curriculum has a few), not one symbolic
    graph made after the first two shapes differ (step-0 evaluation and training usually do), which runs slower."""
    return torch.compile(module, backend=backend, dynamic=False)


def eager_on_compile_failure(fn: Callable, drop_compile: Callable[[], None], say: Callable[[str], None]):
    """fn(), which calls a compiled model for the first time; if that fails (compilation errors surface in the call
    or in its backward), warn once, drop compilation with drop_compile() and return fn() run again eagerly.
    Out-of-memory and the project's own errors are not compilation failures: they propagate."""
    try:
        return fn()
    except (torch.OutOfMemoryError, NanoLladaError):
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        say(
            f"warning: torch.compile failed on its first step ({type(err).__name__}: {first_line}); training on "
            "without compiling (pass --no-compile to skip it from the start)"
        )
        drop_compile()
        return fn()
