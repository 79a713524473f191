"""Turning an AR model into the starting point of a diffusion model."""

from __future__ import annotations

import torch


@torch.no_grad()
def init_mask_embedding(model, mask_id: int, generator: torch.Generator, noise_std: float = 0.02) -> None:
    """Set the <|mask|> row to the mean token embedding plus small noise.

    An AR model never saw <|mask|> as input, so its row is untrained (MiniMind2 has none at all). The mean
    embedding sits where real inputs live, so RMSNorm statistics and attention scales stay ordinary at high
    mask ratios (LLaDA 2.0 reports instabilities from a near-zero mask embedding); the noise makes it distinct
    from the "average token". With tied weights this is also the mask's output row, whose logit is never used.
    """
    embed = model.model.embed_tokens.weight
    real_rows = torch.cat([embed[:mask_id], embed[mask_id + 1 : model.config.vocab_size]])  # no padding rows
    noise = torch.randn(embed.shape[1], generator=generator).to(embed) * noise_std
    embed[mask_id] = real_rows.mean(0) + noise
