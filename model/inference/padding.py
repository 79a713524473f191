"""Left padding for batched generation: prompts of different lengths decoded together.

Every prompt is right-aligned so that generation starts in the same column for all rows. Padding columns are
never attended to (they are masked out as keys) and positions count from each row's first real token, so a
row decodes as it would alone (up to the rounding of batched kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from model.errors import NanoLladaError


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, P] right-aligned with pad_id in front, lengths [B]) for non-empty prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise NanoLladaError("batched generation needs at least one prompt and no empty prompt")
    rows = [torch.tensor(p, dtype=torch.long, device=device) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)


@dataclass
class PaddedLayout:
    """Where each row's real tokens sit on a left-padded canvas of `total` columns (the prompt width is P)."""

    positions: torch.Tensor  # [B, total] RoPE position of every column (0 at the row's first real token)
    real: torch.Tensor  # [B, total] True where the column holds a real token (or a generated one)

    @staticmethod
    def build(prompt_lengths: torch.Tensor, prompt_width: int, total: int) -> PaddedLayout:
        columns = torch.arange(total, device=prompt_lengths.device)
        start = (prompt_width - prompt_lengths)[:, None]
        return PaddedLayout((columns[None, :] - start).clamp(min=0), columns[None, :] >= start)

    def select(self, rows: torch.Tensor) -> PaddedLayout:
        return PaddedLayout(self.positions[rows], self.real[rows])

    def repeat(self, times: int) -> PaddedLayout:
        """The layout of `times` stacked copies of the batch (classifier-free guidance doubles the rows)."""
        return self if times == 1 else PaddedLayout(self.positions.repeat(times, 1), self.real.repeat(times, 1))

    def key_mask(self, key_columns: torch.Tensor) -> torch.Tensor:
        """Boolean attention mask [B, 1, 1, S] for keys at these canvas columns: padding is never attended to.
        One row for every query, so padding queries still see the real keys (no empty softmax, no NaN)."""
        return self.real[:, key_columns][:, None, None, :]
