"""Device habits shared by training, evaluation and benchmarks: bf16 autocast on CUDA, TF32 matmuls, honest timing,
torch.compile with an eager way out, and no silent CPU run on a machine whose GPU torch cannot use."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.errors import NanoLladaError


def autocast(device: torch.device, dtype: str):
    """Autocast to `dtype` on CUDA; CPU runs float32 (CPU autocast is slower there and changes nothing we need)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def enable_tf32(device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (--dtype float32 and whatever autocast leaves in fp32): about
    8x the fp32 rate on an H100 for a 10-bit mantissa in the products, which training never notices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# The oldest driver branch each CUDA major version runs on (NVIDIA's minor-version compatibility).
MIN_DRIVER = {11: "450", 12: "525", 13: "580"}


def nvidia_device_present() -> bool:
    """Whether the machine has an NVIDIA GPU with its kernel driver loaded, whether or not torch can use it."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def nvidia_driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \w+)?\s+([0-9][0-9.]+)", text)
    return found.group(1) if found else None


def unusable_gpu_reason() -> str | None:
    """Why torch cannot use this machine's NVIDIA GPU, in one line with the fix; None without a GPU or when CUDA
    works. The usual cause is a driver older than the CUDA torch was built for."""
    if torch.cuda.is_available() or not nvidia_device_present():
        return None
    built = torch.version.cuda
    if built is None:
        return (
            f"an NVIDIA GPU is present but torch {torch.__version__} is a CPU-only build: install a CUDA build of "
            "torch, or pass --device cpu to run on the CPU"
        )
    need = MIN_DRIVER.get(int(built.split(".")[0]), "a recent")
    driver = nvidia_driver_version() or "unknown"
    return (
        f"an NVIDIA GPU is present but CUDA is unusable: torch {torch.__version__} is built for CUDA {built}, which "
        f"needs NVIDIA driver {need} or newer, and this machine's driver is {driver}; update the driver, or install "
        "a torch built for an older CUDA (e.g. `uv pip install torch --index-url https://download.pytorch.org/whl/"
        "cu126`), or pass --device cpu to run on the CPU"
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall clock read after it measures the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> tuple[object, float]:
    """(fn()'s value, wall seconds), synchronised on CUDA so the seconds cover the queued work."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


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
