"""LLaDA 2.0 SFT extras, as library functions for the diffusion SFT trainer (section 3.7 d, e):
block-diffusion SFT, mask-ratio bandwidth, complementary masking and the confidence-aware (CAP) loss.

Maskable ids in SFT (as in model/diffusion.py): the response and its EOS padding; never a prompt token. Blocks
start at position 0 of the row (prompt included), exactly as at inference (model/sampling.py, block-causal mode),
so the first response block may share its block with the tail of the prompt, which stays clean.

Wiring into a trainer (one call per batch):
    loss = block_sft_loss(model, input_ids, response_mask, rng, mask_id, block_size=32,
                          t_range=(0.3, 0.8), complementary=True, cap_weight=2.0)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.block_diffusion import bdlm_forward, elbo_weight, mask_probability
from model.diffusion import mask_tokens, masked_token_nll
from model.errors import NanoLladaError
from model.tokenizer import EOS_ID


def sample_time_in_band(batch_size: int, t_min: float, t_max: float, rng: torch.Generator, device) -> torch.Tensor:
    """Mask-ratio bandwidth: t ~ U[t_min, t_max] per row (dFactory default [0.3, 0.8]).

    Under the linear schedule t is the mask ratio. A band narrower than (0, 1) trades the ELBO's unbiasedness
    for lower gradient variance: the weighted loss is then an estimate restricted to that band of noise levels.
    """
    if not 0 < t_min <= t_max < 1:
        raise NanoLladaError(f"the mask-ratio band must satisfy 0 < min <= max < 1, got [{t_min}, {t_max}]")
    return t_min + (t_max - t_min) * torch.rand(batch_size, device=device, generator=rng)


def complementary_masks(
    maskable: torch.Tensor, mask_prob: torch.Tensor, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, m'): m masks each maskable position with probability mask_prob[row] (at least one), m' = maskable & ~m.

    m and m' are disjoint and together cover the maskable region exactly, so each response token is supervised
    once per pair; positions outside `maskable` (the prompt) are clean in both. m' has mask ratio 1 - ratio(m):
    with a linear or cosine schedule it is the mask of time 1 - t, and is weighted with elbo_weight(1 - t).
    """
    _, masked = mask_tokens(torch.zeros_like(maskable, dtype=torch.long), maskable, mask_prob, 1, rng)
    return masked, maskable & ~masked


def cap_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Confidence-aware parallel (CAP, dParallel) loss: mean entropy of p_theta over masked positions whose
    argmax already equals the target. It sharpens predictions that are right, so more tokens clear a decoding
    threshold per step. >= 0; exactly 0 when no masked prediction is correct or every correct one is one-hot.
    """
    # Entropy at every position, averaged over the selected ones by a masked sum over a clamped count: boolean
    # indexing or `if correct.any()` would sync with the host and give data-dependent shapes (no torch.compile).
    logits = logits.float()
    correct = masked & (logits.argmax(-1) == targets)
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # p = 0 entries contribute 0 (and a zero gradient), not 0 * -inf.
    entropy = -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)
    return torch.where(correct, entropy, 0.0).sum() / correct.sum().clamp(min=1)


def pad_to_block_multiple(
    input_ids: torch.Tensor, maskable: torch.Tensor, block_size: int, pad_id: int = EOS_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows with EOS to a multiple of block_size; the padding is response (maskable), as LLaDA's SFT
    EOS padding is (that is how the model learns to stop)."""
    extra = -input_ids.shape[1] % block_size
    if extra == 0:
        return input_ids, maskable
    return F.pad(input_ids, (0, extra), value=pad_id), F.pad(maskable, (0, extra), value=True)


def block_sft_loss(
    model,
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    rng: torch.Generator,
    mask_id: int,
    block_size: int | None = None,
    t_range: tuple[float, float] = (1e-3, 1 - 1e-3),
    schedule: str = "linear",
    complementary: bool = False,
    cap_weight: float = 0.0,
) -> torch.Tensor:
    """LLaDA SFT loss with the LLaDA 2.0 switches; a scalar to backpropagate.

    input_ids [B, L]: prompt + response + EOS padding; maskable [B, L]: the response incl. its EOS padding.
    - block_size None: masked diffusion over the response with a bidirectional forward (LLaDA SFT).
      block_size K: block-diffusion SFT (LLaDA 2.0 Eq. 5) on [x_t ; x_0] with the BD3LM mask. Every response block
      is noised at once and denoised from itself plus the clean earlier blocks (prompt included); later blocks are
      invisible through the mask, so nothing needs replacing by <|mask|>. Rows are EOS-padded to a multiple of K.
    - t_range: mask-ratio bandwidth (see sample_time_in_band); (eps, 1 - eps) is plain LLaDA SFT.
    - complementary: the batch is doubled with the complementary masks (time 1 - t) of the same rows.
    - cap_weight: lambda of the CAP loss, added on the masked positions of the noisy forward.
    Per row: sum of elbo_weight(t) * CE over masked positions / number of maskable positions (A_b, section 3.2);
    mean over rows. With uniform logits and t_range (0, 1) the expectation is ln|V|.
    """
    if block_size is not None:
        input_ids, maskable = pad_to_block_multiple(input_ids, maskable, block_size)
    B = input_ids.shape[0]
    t = sample_time_in_band(B, *t_range, rng, input_ids.device)
    if complementary:
        masked, complement = complementary_masks(maskable, mask_probability(t, schedule), rng)
        input_ids, maskable = input_ids.repeat(2, 1), maskable.repeat(2, 1)
        masked, t = torch.cat([masked, complement]), torch.cat([t, 1 - t])
    else:
        _, masked = mask_tokens(input_ids, maskable, mask_probability(t, schedule), mask_id, rng)
    noisy = input_ids.masked_fill(masked, mask_id)
    if block_size is None:
        logits = model(noisy, attention="bidirectional")
    else:
        logits = bdlm_forward(model, noisy, input_ids, block_size)
    per_row = (masked_token_nll(logits, input_ids, masked) * elbo_weight(t, schedule)[:, None]).sum(1)
    loss = (per_row / maskable.sum(1).clamp(min=1)).mean()
    if cap_weight:
        loss = loss + cap_weight * cap_loss(logits, input_ids, masked)
    return loss
