"""TrainConfig, the settings of the training loop, and the optimisation it sets: the learning-rate schedule
and AdamW's parameter groups."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.errors import NanoLladaError
from scripts.common.settings import flag

LR_SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class TrainConfig:
    run_name: str
    kind: str  # "ar" | "diffusion": the kind written into checkpoints
    max_steps: int  # optimizer steps
    out_dir: str = "weights"
    learning_rate: float = flag(5e-4, "peak learning rate", "--lr")
    lr_schedule: str = flag(
        "cosine", "warmup, then cosine decay, WSD (hold, then decay) or constant", choices=LR_SCHEDULES
    )
    warmup_steps: int = flag(100, "linear warmup steps", low=0)
    lr_stable_ratio: float = flag(0.4, "wsd: fraction of steps held at the peak LR after warmup")
    min_lr_ratio: float = flag(0.1, "the LR decays to this fraction of the peak")
    weight_decay: float = flag(0.1, "AdamW weight decay (not on norms and biases)")
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = flag(1.0, "clip the gradient norm to this")
    accumulation_steps: int = flag(1, "micro-batches per optimizer step", low=1)
    eval_interval: int = flag(200, "optimizer steps between validations", low=1)
    eval_batches: int = flag(8, "validation batches (the same ones at every evaluation)", low=1)
    save_interval: int = flag(500, "optimizer steps between checkpoints", low=1)
    log_interval: int = flag(10, "optimizer steps between metrics lines", low=1)
    early_stop_patience: int = flag(0, "evals without improvement before stopping (0 = off)", low=0)
    early_stop_min_delta: float = flag(0.0, "the least validation improvement that counts")
    dtype: str = flag("bfloat16", "autocast dtype on CUDA (CPU runs float32)", choices=["bfloat16", "float32"])
    compile: bool | None = flag(
        False,
        "torch.compile on CUDA (default: on for pretraining; off for SFT, whose batches vary in length)",
        kind=bool,
    )
    # torch.compile backend. --compile compiles on CUDA, as it always did; the CPU compiles only with a backend other
    # than inductor (the tests use eager / aot_eager there, to check the compiled training loop quickly).
    compile_backend: str = "inductor"
    seed: int = flag(42, "seed of the data order, the masks and the initial weights")

    def compile_backend_on(self, device: torch.device) -> str | None:
        """The backend the training model is compiled with on `device`, or None: eager."""
        if not self.compile or (device.type != "cuda" and self.compile_backend == "inductor"):
            return None
        return self.compile_backend

    def validate(self) -> None:
        for name in ("learning_rate", "lr_stable_ratio", "min_lr_ratio", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise NanoLladaError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not math.isfinite(self.early_stop_min_delta) or self.weight_decay < 0:
            raise NanoLladaError("--early-stop-min-delta must be finite and --weight-decay >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise NanoLladaError(f"--lr-schedule must be cosine, wsd or constant, got '{self.lr_schedule}'")
        if self.max_steps <= 0:
            raise NanoLladaError(
                f"nothing to train: {self.max_steps} optimizer steps "
                "(check --epochs/--max-iters, batch size and data size)"
            )
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.lr_stable_ratio <= 1:
            raise NanoLladaError("--min-lr-ratio and --lr-stable-ratio must lie in [0, 1]")
        for name in ("learning_rate", "accumulation_steps", "eval_interval", "save_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise NanoLladaError(f"--{name.replace('_', '-')} must be > 0")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr (cosine), or a plateau then linear decay to min_lr (wsd)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return peak
    if cfg.lr_schedule == "wsd":
        decay_start = min(cfg.max_steps, warmup + int(cfg.lr_stable_ratio * cfg.max_steps))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return peak + (floor - peak) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, while norms and the (tied) embedding do not (decaying them only hurts)."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (no_decay if param.dim() < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
