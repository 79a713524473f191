"""What every diffusion ELBO estimator is made of (the evaluations' NELBO and likelihoods, and DPO's answer
scores): rows padded to whole blocks, per-row sums of weighted NLL at the masked positions of a noisy copy, and the
exact-count mask draws (LLaDA Eq. 14) of the evaluations' bound and of diffusion DPO."""

from __future__ import annotations

import torch

from model.block_attention import bdlm_forward
from model.logit_shift import is_shifted, read_shifted
from model.objectives.diffusion_loss import masked_token_nll
from model.objectives.masking import mask_exactly, stratified_counts


def masked_nll_sums(
    model, clean: torch.Tensor, masked: torch.Tensor, weights: torch.Tensor, mask_id: int, block_size=None, keys=None
) -> torch.Tensor:
    """Per-row sums of weights * NLL over the masked positions, float64 [N]; keys [N, T] (optional): the positions
    a row may attend to (right padding of rows of unequal length)."""
    noisy = clean.masked_fill(masked, mask_id)
    if block_size is not None:
        logits = bdlm_forward(model, noisy, clean, block_size)
    else:
        logits = model(noisy, attention="bidirectional" if keys is None else keys[:, None, None, :])
        logits = read_shifted(logits) if is_shifted(model) else logits
    return (masked_token_nll(logits, clean, masked).double() * weights).sum(1)


def exact_count_draws(
    scored: torch.Tensor, num_samples: int, generator: torch.Generator, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, weights), both [num_samples, R, T]: per draw, exactly l_g of the n_g scored positions of each group
    g (a row, or each block of a row) are masked, l_g ~ U{1..n_g} stratified over the draws, and every position of
    the group carries the weight n_g / l_g. Rows must be a multiple of block_size long."""
    R, T = scored.shape
    K = T if block_size is None else block_size
    groups = scored.reshape(R * (T // K), K)
    n = groups.sum(1)  # [G]
    counts = stratified_counts(n, num_samples, generator)  # [S, G]
    masked = mask_exactly(groups.repeat(num_samples, 1), counts.flatten(), generator)
    weights = (n.double() / counts.clamp(min=1)).repeat_interleave(K, dim=1)
    return masked.view(num_samples, R, T), weights.view(num_samples, R, T)
