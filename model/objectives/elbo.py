"""What every diffusion ELBO estimator is made of (the evaluations' NELBO and likelihoods, and DPO's answer
scores): rows padded to whole blocks, and per-row sums of weighted NLL at the masked positions of a noisy copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.block_attention import bdlm_forward
from model.logit_shift import is_shifted, read_shifted
from model.objectives.diffusion_loss import masked_token_nll
from model.tokenizer import PAD_ID


def pad_to_blocks(input_ids: torch.Tensor, scored: torch.Tensor, block_size: int | None):
    """Right-pad rows with unscored PAD to a multiple of block_size: later blocks never reach earlier ones."""
    pad = 0 if block_size is None else -input_ids.shape[1] % block_size
    if pad == 0:
        return input_ids, scored
    return F.pad(input_ids, (0, pad), value=PAD_ID), F.pad(scored, (0, pad), value=False)


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
