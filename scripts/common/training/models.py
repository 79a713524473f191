"""The weights of a run in the wrappings each use needs: compiled (with --compile on CUDA), wrapped in DDP under
torchrun for training, compiled only for evaluation; the first compiled call of each use falls back to eager."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from scripts.common.device import compiled, eager_on_compile_failure
from scripts.common.training import distributed


@dataclass
class Models:
    """One set of weights in the wrappings each use needs."""

    plain: torch.nn.Module  # what checkpoints hold and clipping sees
    train: torch.nn.Module  # compiled (with --compile on CUDA) and wrapped in DDP under torchrun
    eval: torch.nn.Module  # compiled only: without DDP, ranks may score different numbers of batches
    ddp: torch.nn.parallel.DistributedDataParallel | None
    compiled: bool = False
    proven: set = field(default_factory=set)  # uses ("train", "eval") whose first compiled call went through

    @classmethod
    def wrap(cls, model: torch.nn.Module, backend: str | None, device: torch.device, env: distributed.Dist) -> Models:
        eval_model = compiled(model, backend) if backend else model
        ddp = distributed.wrap(model, device) if env.enabled else None
        train_model = eval_model if ddp is None else (compiled(ddp, backend) if backend else ddp)
        return cls(model, train_model, eval_model, ddp, compiled=backend is not None)

    def first_call(self, use: str, fn: Callable, say: Callable[[str], None]):
        """fn() (it calls self.train or self.eval); the first call of each use falls back to eager if compiling
        fails."""
        if not self.compiled or use in self.proven:
            return fn()
        result = eager_on_compile_failure(fn, self.drop_compile, say)
        self.proven.add(use)
        return result

    def drop_compile(self) -> None:
        self.train, self.eval, self.compiled = self.plain if self.ddp is None else self.ddp, self.plain, False
