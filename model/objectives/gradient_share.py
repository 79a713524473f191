"""How much of an SFT step's gradient the label gets: for a one-decision answer (the sentiment questions) the first
answer token is the whole decision, and an objective that spends its gradient elsewhere learns it slowly."""

from __future__ import annotations

import torch


@torch.no_grad()
def label_gradient_share(nll: torch.Tensor, weight: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """The share of the loss's gradient w.r.t. the logits that falls on each row's first supervised position, a
    0-dim tensor in [0, 1] (kept on the device: the trainer reads it at its log interval, not every step).

    nll, weight, supervised [B, L]: each position's cross-entropy, its factor in the loss (0 where not scored this
    step), and the positions the objective supervises at all. A position's gradient dCE/dlogits = softmax - onehot has
    an L2 norm between 1 - p and sqrt(2) (1 - p), p = exp(-nll) the target's probability, so weight * (1 - p) measures
    it to within sqrt(2).
    """
    first = supervised & (supervised.long().cumsum(1) == 1)
    size = weight.float() * -torch.expm1(-nll.float())
    return (size * first).sum() / size.sum().clamp(min=1e-12)
