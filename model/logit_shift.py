"""The logit shift of AR-converted diffusion models: the prediction for position i is read at position i - 1.

An AR model's head predicts token i + 1 at position i. A diffusion model converted from it can keep that head
(Dream, Fast-dLLM v2, SDAR) instead of relearning a head that predicts each position in place. The shift is a
property of the model (ModelConfig.logit_shift), so every loss, sampler and likelihood reads it from there.
Position 0 has no position before it: a shifted model never predicts a row's first token, which is always
context (a prompt's first token, or BOS of a pretraining row).
"""

from __future__ import annotations

import torch


def config_of(model):
    """The ModelConfig of `model` or of the module a DDP / compile wrapper holds (None for a bare callable)."""
    config = getattr(model, "config", None)
    return getattr(getattr(model, "module", None), "config", None) if config is None else config


def is_shifted(model) -> bool:
    """Whether `model` predicts each position one to its left."""
    return bool(getattr(config_of(model), "logit_shift", False))


def read_shifted(logits: torch.Tensor, before: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions [B, T, V] for the T positions of `logits` [B, T, V] of a shifted model: each the output one
    position to the left. `before` [B, V] is the output just left of the window; without it the first column
    repeats the window's own first output, a placeholder for a position that is never predicted."""
    first = logits[:, :1] if before is None else before[:, None].to(logits.dtype)
    return torch.cat([first, logits[:, :-1]], dim=1)


def predictable(maskable: torch.Tensor, shifted: bool) -> torch.Tensor:
    """`maskable` [B, L] without position 0 when the model is shifted (nothing predicts it)."""
    return maskable & (torch.arange(maskable.shape[1], device=maskable.device) > 0) if shifted else maskable
