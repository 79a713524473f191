"""Loss terms that shape how a diffusion model decodes, added to the NELBO by DiffusionObjective's weights:
sharper predictions where they are right (CAP), and fewer runs of one repeated token."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cap_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Confidence-aware parallel (CAP, dParallel) loss: mean entropy of p_theta over masked positions whose
    argmax already equals the target. It sharpens predictions that are right, so more tokens clear a decoding
    threshold per step. >= 0; exactly 0 when no masked prediction is correct or every correct one is one-hot.
    """
    # Masked sums over clamped counts throughout: boolean indexing or `if correct.any()` would sync with the host
    # and give data-dependent shapes (no torch.compile).
    logits = logits.float()
    correct = masked & (logits.argmax(-1) == targets)
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)  # p = 0 entries contribute 0, not 0 * -inf
    return torch.where(correct, entropy, 0.0).sum() / correct.sum().clamp(min=1)


def repeat_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(target)) over masked positions whose target repeats the previous token (0 if none):
    pushes probability away from runs of identical tokens, a failure mode of small diffusion models."""
    repeats = F.pad(masked[:, 1:] & (targets[:, 1:] == targets[:, :-1]), (1, 0), value=False)
    p = logits.float().softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    unlikelihood = torch.where(repeats, -torch.log1p(-p.clamp(max=1 - 1e-6)), 0.0)
    return unlikelihood.sum() / repeats.sum().clamp(min=1)
