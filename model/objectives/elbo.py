"""What every diffusion ELBO estimator sums (the evaluations' NELBO and likelihoods, and DPO's answer scores): per-row
weighted NLL at the masked positions of a noisy copy. The masks are drawn in model/objectives/masking.py."""

from __future__ import annotations

import torch

from model.block_attention import bdlm_forward
from model.logit_shift import is_shifted, read_shifted
from model.objectives.diffusion_loss import masked_token_nll


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
