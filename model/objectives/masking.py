"""The forward process of masked diffusion: which tokens may be masked, how t and the masks are drawn.

Which ids are maskable (decided once, here):
- every real token of a pretraining row, BOS and EOS included: they mark where documents start and end,
  and a diffusion model must learn to place them (it decides the length of what it writes);
- never PAD (<|endoftext|>, id 0);
- in SFT, never a prompt token; the EOS padding after the answer is maskable (that is how it learns to stop).
The mask token itself is never a target, and its logit is never sampled (see sampling.py).

No draw forces a mask into a row: a row that drew none contributes 0 to a loss, which keeps every 1/t-weighted
estimate unbiased (forcing one token in and weighting it 1/t inflates short rows' losses by up to 1/eps).
"""

from __future__ import annotations

import torch

from model.errors import NanoLladaError
from model.tokenizer import EOS_ID, PAD_ID


def pretraining_maskable(input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids != PAD_ID


def eos_padding(input_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """The EOS padding of SFT rows: maskable EOS tokens after the answer's own closing EOS (the first of the
    trailing run of EOS; PAD columns after the run, where the padding is capped, are not part of the row). Only rows
    padded to a common length, or given a fixed padding, have any."""
    tail = (input_ids == EOS_ID) | (input_ids == PAD_ID)
    trailing = tail.flip(1).long().cumprod(1).flip(1).bool() & maskable
    return trailing & torch.nn.functional.pad(trailing[:, :-1], (1, 0), value=False)


# ----------------------------------------------------------------------------- times


def position_rates(length: int, block_size: int | None, strength: float, device=None) -> torch.Tensor:
    """Position-dependent masking (Efficient-DLM: later tokens of a block are masked more often, as they stay masked
    longer when decoding runs roughly left to right): rates k_j = exp(strength * r_j) >= 1, r_j in [0, 1] the
    relative position of j in its block (in the row without blocks), float [length]. strength 0: every k_j = 1."""
    width = length if block_size is None else block_size
    offset = torch.arange(length, device=device) % width
    return torch.exp(strength * offset.float() / max(width - 1, 1))


def warped_time(t: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, dtau/dt), both [B, L]: each position's own time tau_j = 1 - (1 - t)^k_j for t [B, 1], rates k [L].

    Position j is masked with probability 1 - alpha(tau_j) and weighted by the ELBO weight at tau_j times
    dtau_j/dt, which keeps the loss an unbiased ELBO (uniform logits still give ln|V| per token). The warp runs
    from 0 to 1 with a finite slope at t = 0, so the t_min cut-off loses only O(k t_min) of it. k_j = 1 is the
    ordinary schedule; k_j > 1 masks position j more often (about k_j times as often at small t).
    """
    clean = 1 - t
    return 1 - clean**rates, rates * clean ** (rates - 1)


def check_time_range(t_min: float, t_max: float) -> None:
    if not 0 < t_min <= t_max < 1:
        raise NanoLladaError(f"the time range must satisfy 0 < t_min <= t_max < 1, got [{t_min}, {t_max}]")


def sample_time(
    batch_size: int, rng: torch.Generator, device, t_min: float = 1e-3, t_max: float = 1 - 1e-3
) -> torch.Tensor:
    """t ~ U(t_min, t_max) per row. (eps, 1 - eps) is LLaDA's U(0, 1] with every ELBO weight kept finite; a
    narrower band (LLaDA 2.0's mask-ratio bandwidth, e.g. [0.3, 0.8]) trades unbiasedness for lower variance."""
    check_time_range(t_min, t_max)
    return t_min + (t_max - t_min) * torch.rand(batch_size, device=device, generator=rng)


def late_heavy_time(
    batch_size: int, rng: torch.Generator, device, t_min: float, t_max: float, share: float, start: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, importance weight) per row: t from the mixture (1 - share) U(t_min, t_max) + share U(start, t_max), which
    draws t near 1 (the all-masked canvas decoding starts from) more often, and u(t) / q(t), the uniform density over
    the mixture's. Multiplying the ELBO weight by it keeps the estimate unbiased for the same NELBO as t ~ U(t_min,
    t_max): only the variance changes (the late rows weigh less, the early ones more)."""
    uniform = sample_time(batch_size, rng, device, t_min, t_max)
    late = sample_time(batch_size, rng, device, start, t_max)
    t = torch.where(torch.rand(batch_size, device=device, generator=rng) < share, late, uniform)
    density = (1 - share) / (t_max - t_min) + share / (t_max - start) * (t >= start).float()
    return t, 1 / ((t_max - t_min) * density)


# ----------------------------------------------------------------------------- masks


def bernoulli_masks(maskable: torch.Tensor, mask_prob: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Mask each maskable position independently with probability mask_prob[row] (or mask_prob[row, position]
    when it is [B, L]).

    Its complement maskable & ~masked has mask probability 1 - mask_prob: under the linear and cosine schedules that
    is time 1 - t (LLaDA 2.0's complementary masking: the two cover the maskable region, each token supervised once).
    """
    prob = mask_prob if mask_prob.dim() == 2 else mask_prob[:, None]
    return (torch.rand(maskable.shape, device=maskable.device, generator=rng) < prob) & maskable


def stratified_counts(n: torch.Tensor, num_draws: int, rng: torch.Generator | None, offset=None) -> torch.Tensor:
    """How many of n[row] positions each of num_draws draws masks, int64 [num_draws, rows], in 1..n (0 if n = 0).

    Draw d of a row takes u = (offset + d / num_draws) mod 1 with offset ~ U[0, 1) and masks floor(u n) + 1
    positions: every draw is exactly uniform on 1..n (LLaDA Algorithm 3), and the draws of a row are spread
    evenly over 1..n (exactly balanced when num_draws is a multiple of n). `offset` (float64, as n): the offsets
    when the caller draws them (DPO's paired draws), instead of from rng.
    """
    if offset is None:
        offset = torch.rand(n.shape, device=n.device, generator=rng, dtype=torch.float64)
    draws = torch.arange(num_draws, device=n.device, dtype=torch.float64)[:, None]
    u = torch.frac(offset[None, :] + draws / num_draws)
    return torch.minimum((u * n).long() + 1, n).clamp(min=0)


def mask_exactly(scored: torch.Tensor, counts: torch.Tensor, rng: torch.Generator | None, noise=None) -> torch.Tensor:
    """Mask exactly counts[row] of the scored positions of each row (along the last dim), uniformly without
    replacement: the positions of the lowest uniform `noise` (as scored; drawn from rng unless given)."""
    noise = torch.rand(scored.shape, device=scored.device, generator=rng) if noise is None else noise
    ranks = noise.masked_fill(~scored, 2.0).argsort(-1).argsort(-1)
    return (ranks < counts[..., None]) & scored


def exact_count_draws(
    scored: torch.Tensor, num_samples: int, generator: torch.Generator, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, weights), both [num_samples, R, T]: per draw, exactly l_g of the n_g scored positions of each group
    g (a row, or each block of a row) are masked, l_g ~ U{1..n_g} stratified over the draws, and every position of
    the group carries the weight n_g / l_g (LLaDA Eq. 14). Rows must be a multiple of block_size long."""
    R, T = scored.shape
    K = T if block_size is None else block_size
    groups = scored.reshape(R * (T // K), K)
    n = groups.sum(1)  # [G]
    counts = stratified_counts(n, num_samples, generator)  # [S, G]
    masked = mask_exactly(groups.repeat(num_samples, 1), counts.flatten(), generator)
    weights = (n.double() / counts.clamp(min=1)).repeat_interleave(K, dim=1)
    return masked.view(num_samples, R, T), weights.view(num_samples, R, T)


# How many lengths a crop may take (the full row included): each is one compiled graph, and Dynamo compiles at most
# 8 per function before running new shapes eagerly.
CROP_BUCKETS = 4


def crop_lengths(seq_len: int, multiple_of: int = 1, buckets: int = CROP_BUCKETS) -> list[int]:
    """The lengths a crop rounds up to: `buckets` evenly spaced multiples of `multiple_of`, the last seq_len."""
    step = -(-seq_len // buckets)
    step = -(-step // multiple_of) * multiple_of
    return sorted({min(seq_len, k * step) for k in range(1, buckets + 1)})


def random_crop_length(seq_len: int, prob: float, generator: torch.Generator, multiple_of: int = 1) -> int:
    """With probability `prob`, a random length in 1..seq_len rounded up to one of crop_lengths (a few fixed lengths,
    so a compiled model compiles a few graphs), to crop the whole batch to; else seq_len. LLaDA trains 1% of its
    data at a random length this way, so the model also sees sequences that end early; cropping instead of padding
    leaves no PAD for real tokens to attend to. Drawn on the CPU from its own generator: the shape decision never
    waits for the GPU."""
    if prob <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return seq_len
    length = int(torch.randint(1, seq_len + 1, (), generator=generator))
    return next(n for n in crop_lengths(seq_len, multiple_of) if n >= length)
