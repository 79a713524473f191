"""Keep the GPU fed: build the next micro-batches on a background thread while the device runs this one.

`batch_fn(k)` is a pure function of k (see distributed.py), so building ahead changes nothing but timing.
On CUDA the batches are pinned, which makes the trainer's `.to(device, non_blocking=True)` a real asynchronous
copy instead of a synchronous one from pageable memory.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def tokens_in(batch) -> int:
    """Tokens in a batch: a tensor of rows, or a dict whose "input_ids" are the rows."""
    return (batch["input_ids"] if isinstance(batch, dict) else batch).numel()


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch):
    """The batch with fn applied to every tensor (tensors inside dicts, tuples and lists too); other values kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(fn, value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, value) for value in batch)
    return batch


def to_device(batch, device: torch.device):
    """The batch on `device`; pinned tensors copy asynchronously."""
    return map_tensors(lambda tensor: tensor.to(device, non_blocking=True), batch)


def pin(batch):
    """The batch in page-locked memory."""
    return map_tensors(torch.Tensor.pin_memory, batch)


class Prefetcher:
    """`get(k)` returns batch_fn(k); batches k+1 .. k+depth are already being built when it returns.
    Batches at or past `stop` are never built; an error of batch_fn is raised by the `get` that asks for it.
    With a CUDA `pin_device` the batches are pinned, and the worker thread makes that device current first (as
    PyTorch's DataLoader does), so a rank > 0 does not open a CUDA context on GPU 0."""

    def __init__(
        self, batch_fn: Callable[[int], object], stop: int, pin_device: torch.device | None = None, depth: int = 2
    ):
        self.batch_fn, self.stop, self.depth = batch_fn, stop, depth
        self.pin_memory = pin_device is not None and pin_device.type == "cuda"
        initializer = None
        if self.pin_memory:  # a bare "cuda" means the device current in the calling thread
            index = pin_device.index if pin_device.index is not None else torch.cuda.current_device()
            initializer = lambda: torch.cuda.set_device(index)  # noqa: E731
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch", initializer=initializer)
        self.pending: dict[int, Future] = {}

    def _build(self, k: int):
        batch = self.batch_fn(k)
        return pin(batch) if self.pin_memory else batch

    def get(self, k: int):
        future = self.pending.pop(k, None) or self.pool.submit(self._build, k)
        for stale in [j for j in self.pending if j < k]:  # a caller that skipped ahead: drop what it will not ask for
            self.pending.pop(stale).cancel()
        for ahead in range(k + 1, min(k + 1 + self.depth, self.stop)):
            if ahead not in self.pending:
                self.pending[ahead] = self.pool.submit(self._build, ahead)
        return future.result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.pending.clear()
