"""Data-parallel training under torchrun: process group, global-batch sharding, rank-0-only side effects.

`torchrun --nproc_per_node N -m scripts.train.X ...` sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1
the trainer wraps the model in DistributedDataParallel (NCCL for CUDA tensors, gloo for CPU ones). Without
them (or with WORLD_SIZE=1) nothing here does anything and a run is exactly the single-process run.

The rule for batches: `batch_fn(k)` is the *global* micro-batch k whatever the process count. Every rank builds
it (it is a cheap pure function of (seed, k)) and trains on its contiguous slice of the rows (`shard`: shards
differ by at most one row). The trainer scales each rank's loss by N * count(shard) / count(global batch),
`count` being what the loss is a mean over, and DDP averages the gradients, so the result is the gradient of
the global-batch loss: N processes see exactly the data (and for deterministic losses the gradient, up to fp32
summation order) of one process with the same --batch-size. Checkpoints store the global step, which is also
the data position, so a run can resume with a different N.

Losses that draw random numbers (diffusion masks) get one generator per rank, seeded by (seed, k, rank): the same
rows as one process, other (equally distributed) masks. Validation matches one process: rank r scores batches
r, r+N, ... with the single-process seeds and the per-batch losses are summed over ranks.
Entry points print on rank 0 only (`scripts.common.cli.run_main` discards the other ranks' stdout; errors still
reach stderr).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.errors import NanoLladaError
from scripts.common.training.prefetch import map_tensors

_initialised_here = False  # destroy the process group only if this module created it


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def init() -> Dist:
    """Join the torchrun process group once (idempotent); a no-op for single-process runs."""
    global _initialised_here
    env = from_env()
    if env.enabled and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)  # one GPU per process; NCCL needs it before the first collective
            backend = "cpu:gloo,cuda:nccl"  # CPU tensors (barriers, --device cpu runs) still have a backend
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        _initialised_here = True
    return env


def shutdown() -> None:
    global _initialised_here
    if _initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    _initialised_here = False


def local_device(device: torch.device, env: Dist) -> torch.device:
    """Under torchrun, a bare "cuda" means this process's own GPU (LOCAL_RANK)."""
    if env.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around `model`. Its buffers are RoPE tables, equal on every rank, so forward passes skip the buffer
    broadcast: forwards then hold no collective, and ranks may score different numbers of validation batches."""
    # torch 2.15 renamed broadcast_buffers (kept, deprecated); pyproject allows torch >= 2.5, which has only the
    # old name.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


def barrier() -> None:
    """Wait for every rank. A CPU all_reduce, so it goes through gloo in both backends' set-ups."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(torch.zeros(1))


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. tokenizing into a cache file), then the others (which read the cache)."""
    env = init()
    if env.enabled and not env.is_main:
        barrier()
    yield
    if env.enabled and env.is_main:
        barrier()


def local_share(batch, env: Dist, loss_count) -> tuple[object, float]:
    """This rank's slice of the global batch and the weight of its loss: N * count(slice) / count(global batch),
    so that with DDP's gradient mean the ranks' losses add up to the global-batch loss (1.0 for one process).

    Exact when the loss is a mean over what `loss_count` counts: packed rows (every row full, so tokens are
    proportional to rows) and losses that are a mean over rows of one padded width. A per-token mean over a
    varying number of scored tokens (AR SFT) is exact only if loss_count counts the scored tokens; otherwise ranks
    are weighted by their row share, an approximation. Losses normalised by a random count (LLaDA Eq. 3 after a
    random crop) are weighted right in expectation; they draw random masks anyway."""
    if not env.enabled:
        return batch, 1.0
    local = shard(batch, env.rank, env.world_size)
    if rows_in(local) == 0:
        raise NanoLladaError(
            f"a batch of {rows_in(batch)} rows cannot be split over {env.world_size} processes; "
            f"use a --batch-size of at least {env.world_size}"
        )
    total = float(loss_count(batch))
    return local, (env.world_size * float(loss_count(local)) / total if total > 0 else 1.0)


def shard(batch, rank: int, world_size: int):
    """Rank `rank`'s contiguous slice (dim 0) of every tensor in a batch: a tensor, or a tuple/list/dict of them.
    Other values and 0-dim tensors are kept whole. Slicing the collated global batch keeps its padding width, so a
    padded SFT row is the same row on any number of processes."""

    def rank_slice(tensor: torch.Tensor) -> torch.Tensor:
        return torch.tensor_split(tensor, world_size)[rank] if tensor.dim() else tensor

    return map_tensors(rank_slice, batch)


def rows_in(batch) -> int | None:
    """Number of rows (dim 0 of the first tensor) of a batch, for the "every rank has rows" check."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        rows = rows_in(value)
        if rows is not None:
            return rows
    return None


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or mean over ranks (identity for single-process runs)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor
