"""The masked-diffusion route (LLaDA): forward process and losses.

Which ids are maskable (decided once, here):
- every real token of a pretraining row, BOS and EOS included: they mark where documents start and end,
  and a diffusion model must learn to place them (it decides the length of what it writes);
- never PAD (<|endoftext|>, id 0): it only fills rows cut short by --variable-length-prob;
- in SFT, never a prompt token; the EOS padding after the answer is maskable (that is how it learns to stop).
The mask token itself is never a target, and its logit is never sampled (see sampling.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.tokenizer import PAD_ID

IGNORE_INDEX = -100  # cross-entropy target of positions that are not scored


def pretraining_maskable(input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids != PAD_ID


def sample_mask_ratio(batch_size: int, eps: float, rng: torch.Generator, device) -> torch.Tensor:
    """t ~ U(eps, 1 - eps) per sequence (LLaDA Eq. 3 draws t in (0, 1]; eps keeps 1/t bounded)."""
    return eps + (1 - 2 * eps) * torch.rand(batch_size, device=device, generator=rng)


def mask_tokens(
    input_ids: torch.Tensor, maskable: torch.Tensor, t: torch.Tensor, mask_id: int, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each maskable token independently with probability t[row]; at least one per row that has any.

    Returns (noisy ids, masked positions). Pure tensor ops: no Python loop over rows.
    """
    scores = torch.rand(input_ids.shape, device=input_ids.device, generator=rng)
    masked = (scores < t[:, None]) & maskable
    # Rows where nothing was drawn get their lowest-scoring maskable position masked.
    forced = torch.zeros_like(masked).scatter_(1, scores.masked_fill(~maskable, 2.0).argmin(1, keepdim=True), True)
    masked |= forced & maskable & ~masked.any(1, keepdim=True)
    return input_ids.masked_fill(masked, mask_id), masked


def cut_to_random_length(input_ids: torch.Tensor, prob: float, rng: torch.Generator) -> torch.Tensor:
    """With probability `prob` per row, keep a random-length prefix (>= 1) and fill the rest with PAD,
    so the model also sees sequences that end before the row does (LLaDA trains 1% of data this way)."""
    B, L = input_ids.shape
    cut = prob > 0 and torch.rand(B, device=input_ids.device, generator=rng) < prob
    if cut is False:
        return input_ids
    lengths = torch.randint(1, L + 1, (B,), device=input_ids.device, generator=rng)
    lengths = torch.where(cut, lengths, L)
    return input_ids.masked_fill(torch.arange(L, device=input_ids.device)[None, :] >= lengths[:, None], PAD_ID)


def masked_token_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-position fp32 cross-entropy at masked positions, 0 elsewhere (with no gradient to their logits).

    Scores every position with ignore_index instead of gathering the masked rows: `logits[masked]` has a
    data-dependent shape, which syncs the GPU with the host and breaks torch.compile graphs.
    """
    ignored = targets.masked_fill(~masked, IGNORE_INDEX)
    nll = F.cross_entropy(logits.float().flatten(0, -2), ignored.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return nll.view(targets.shape)


def llada_loss(
    model,
    input_ids: torch.Tensor,
    rng: torch.Generator,
    mask_id: int,
    eps: float = 1e-3,
    maskable: torch.Tensor | None = None,
    repeat_penalty_weight: float = 0.0,
) -> torch.Tensor:
    """LLaDA Eq. 3: sum over masked tokens of CE / t, divided by the number of maskable tokens.

    An upper bound on the NLL per token (the NELBO); with uniform logits its expectation is ln|V|.
    """
    maskable = pretraining_maskable(input_ids) if maskable is None else maskable
    t = sample_mask_ratio(input_ids.shape[0], eps, rng, input_ids.device)
    noisy, masked = mask_tokens(input_ids, maskable, t, mask_id, rng)
    logits = model(noisy, attention="bidirectional")
    loss = (masked_token_nll(logits, input_ids, masked) / t[:, None]).sum() / maskable.sum().clamp(min=1)
    if repeat_penalty_weight:
        loss = loss + repeat_penalty_weight * repeat_unlikelihood(logits, input_ids, masked)
    return loss


def llada_sft_loss(
    model, input_ids: torch.Tensor, maskable: torch.Tensor, rng: torch.Generator, mask_id: int, eps: float = 1e-3
) -> torch.Tensor:
    """LLaDA SFT: only response tokens (maskable: answers + their EOS padding) are masked, t ~ U(eps, 1-eps);
    loss = mean over samples of (sum of masked CE / t) / answer length A_b, A_b counting the EOS padding."""
    t = sample_mask_ratio(input_ids.shape[0], eps, rng, input_ids.device)
    noisy, masked = mask_tokens(input_ids, maskable, t, mask_id, rng)
    nll = masked_token_nll(model(noisy, attention="bidirectional"), input_ids, masked)
    return ((nll / t[:, None]).sum(1) / maskable.sum(1).clamp(min=1)).mean()


def repeat_unlikelihood(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean of -log(1 - p(target)) over masked positions whose target repeats the previous token (0 if none):
    pushes probability away from runs of identical tokens, a failure mode of small diffusion models."""
    repeats = F.pad(masked[:, 1:] & (targets[:, 1:] == targets[:, :-1]), (1, 0), value=False)
    # Every position is scored and the mean is a masked sum over a clamped count: no boolean indexing and no
    # `if repeats.any()`, either of which would sync with the host and give a data-dependent shape.
    p = logits.float().softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    unlikelihood = torch.where(repeats, -torch.log1p(-p.clamp(max=1 - 1e-6)), 0.0)
    return unlikelihood.sum() / repeats.sum().clamp(min=1)


@torch.no_grad()
def init_mask_embedding(model, mask_id: int, generator: torch.Generator, noise_std: float = 0.02) -> None:
    """Set the <|mask|> row to the mean token embedding plus small noise.

    An AR model never saw <|mask|> as input, so its row is untrained (MiniMind2 has none at all). The mean
    embedding sits where real inputs live, so RMSNorm statistics and attention scales stay ordinary at high
    mask ratios (LLaDA 2.0 reports instabilities from a near-zero mask embedding); the noise makes it distinct
    from the "average token". With tied weights this is also the mask's output row, whose logit is never used.
    """
    embed = model.model.embed_tokens.weight
    others = torch.cat([embed[:mask_id], embed[mask_id + 1 : model.config.vocab_size]])  # real tokens, no padding rows
    noise = torch.randn(embed.shape[1], generator=generator).to(embed) * noise_std
    embed[mask_id] = others.mean(0) + noise
