"""Decoding a prompt-causal model (model/prompt_causal.py): its prompt is read once, causally, into an exact K/V cache.

A prompt-causal model's prompt tokens never see the answer, so their keys and values are the same at every step of
every block: one forward of the prompt fills the cache (counted in NFE), and each step then feeds only the answer
columns, which attend to the cached prompt and to each other, and crops the cache back to the prompt. The tokens
are those of running the whole canvas under the prompt-causal mask at every step (the reference sampler does).
A shifted model predicts the first answer column from the prompt's last output: the prefill's, kept as `before`.
"""

from __future__ import annotations

import torch

from model.inference.padding import PaddedLayout
from model.prompt_causal import prompt_causal_mask


class PromptCache:
    """The prompt's K/V (and a shifted model's last prompt output) for the rows still decoding."""

    def __init__(self, run, canvas: torch.Tensor, layout: PaddedLayout | None):
        P, copies = run.prompt_width, 2 if run.guided else 1
        self.layout, self.copies = layout, copies  # the layout of the rows held, before CFG doubles them
        self.rows = torch.arange(run.batch, device=canvas.device)  # the batch rows the cache holds
        self.cache = run.model.new_kv_cache(run.batch * copies, canvas.shape[1])
        ids = run.inputs(canvas[:, :P], 0)
        if layout is None:
            logits = run.forward(ids, attention="causal", kv_cache=self.cache)
        else:
            layout = layout.repeat(copies)
            mask = prompt_causal_mask(P, P, layout.real[:, :P])
            logits = run.forward(ids, attention=mask, kv_cache=self.cache, positions=layout.positions[:, :P])
        self.before = run.last_output(logits)

    def keep(self, rows: torch.Tensor | None) -> None:
        """Hold only `rows` (batch indices, None: all); rows that have ended never come back."""
        if rows is None or len(rows) == len(self.rows):
            return
        kept = torch.isin(self.rows, rows)
        self.cache.keep_rows(kept.repeat(self.copies))
        self.before = self.before[kept.repeat(self.copies)] if self.before is not None else None
        self.layout = self.layout.select(kept.nonzero().squeeze(1)) if self.layout is not None else None
        self.rows = self.rows[kept]

    def step(self, run, view: torch.Tensor) -> torch.Tensor:
        """Logits of the answer columns [P, ...) of `view` over the cached prompt; the cache is the prompt again."""
        P, end = run.prompt_width, view.shape[1]
        ids = run.inputs(view[:, P:], P)
        if self.layout is None:
            logits = run.forward(ids, attention="bidirectional", kv_cache=self.cache)
        else:
            layout = self.layout.repeat(self.copies)
            keys = layout.key_mask(torch.arange(end, device=view.device))
            logits = run.forward(ids, attention=keys, kv_cache=self.cache, positions=layout.positions[:, P:end])
        self.cache.crop(P)
        return logits
