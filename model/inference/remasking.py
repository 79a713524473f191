"""The remasking step of the fast samplers (model/inference/sampling.py), made of the reference sampler's pieces
(model/inference/reference_sampler.py): how many masked positions a step commits (the sampler's noise schedule, or a
confidence threshold and Fast-dLLM's factor rule), which ones (lowest-confidence remasking or random), to what
tokens (greedy or Gumbel-max sampling, never <|mask|>), under unsupervised classifier-free guidance; and the tally of
forward passes and commits of one generation. For a logit-shifted model (model/logit_shift.py) the prediction for a
column is the output one column to its left: `DecodingRun.predictions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.inference.reference_sampler import (
    combine_guidance,
    commit_top,
    confidences,
    sample_tokens,
    with_unconditional,
)
from model.logit_shift import is_shifted, read_shifted


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, gen_length] generated ids (EOS-filled after an early stop)
    nfe: int  # model forward passes (a CFG pair counts once: it is one batched call)
    commits: list[torch.Tensor] = field(default_factory=list)  # per step: tokens committed per row


def _factor_count(scores: torch.Tensor, factor: float) -> torch.Tensor:
    """Per row, the largest n with (n + 1)(1 - c_n) < factor, c_n the n-th highest confidence (Fast-dLLM's factor
    rule): the bar falls as more positions are confident together, so the count adapts to the block."""
    ranked = scores.sort(dim=-1, descending=True).values  # closed positions (-inf) last, never counted
    n = torch.arange(1, ranked.shape[-1] + 1, device=ranked.device)
    return ((n + 1) * (1 - ranked) < factor).sum(-1)


def _choose_commits(
    logits: torch.Tensor, open_here: torch.Tensor, sampler, quota, mask_id: int, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to commit now, candidate tokens) among the open positions, by quota or by threshold."""
    logits[..., mask_id] = float("-inf")  # the mask token is never a prediction
    candidates = sample_tokens(logits, sampler.temperature, generator)
    confidence = confidences(logits, candidates, sampler.remasking, generator)
    scores = confidence.masked_fill(~open_here, float("-inf"))
    if quota is None:  # threshold decoding: everything confident enough, and at least the best one
        commit = open_here & (confidence >= sampler.threshold)
        if getattr(sampler, "commit_factor", None) is not None:
            commit |= commit_top(scores, _factor_count(scores, sampler.commit_factor))
        commit |= commit_top(scores, open_here.any(1).long()) & ~commit.any(1, keepdim=True)
    else:
        commit = commit_top(scores, quota)
    return commit, candidates


def block_quotas(canvas: torch.Tensor, lo: int, hi: int, mask_id: int, block_steps: int, sampler):
    """For each step of block [lo, hi) that needs a forward pass, the per-row commit quota of the sampler's schedule
    (None when decoding by threshold), until the block has no mask left. The caller commits into `canvas` in place
    between steps. Steps whose quotas are all zero are skipped: nothing to commit, so no forward pass."""
    if sampler.threshold is not None:
        while (canvas[:, lo:hi] == mask_id).any():
            yield None
        return
    quotas = sampler.schedule.step_quotas((canvas[:, lo:hi] == mask_id).sum(1), block_steps)
    for step in range(block_steps):  # the quotas sum to the masked count: no mask is left after the last step
        if not (canvas[:, lo:hi] == mask_id).any():
            return
        if quotas[:, step].any():
            yield quotas[:, step]


class DecodingRun:
    """What every step of one generation shares: model, settings, prompt width, and the tally of forward passes
    and per-row commits (always over the whole batch, whichever rows are still decoding)."""

    def __init__(self, model, sampler, mask_id: int, generator, prompt: torch.Tensor):
        self.model, self.sampler, self.mask_id, self.generator = model, sampler, mask_id, generator
        self.batch, self.prompt_width = prompt.shape
        self.guided = sampler.cfg_scale != 0
        self.shifted = is_shifted(model)
        self.result = SampleResult(prompt[:, :0], 0)
        self.finish_id: int | None = None  # EOS, when a row may finish inside a block (finish_at_eos)

    def predictions(self, logits: torch.Tensor, first: int, lo: int, hi: int, before=None) -> torch.Tensor:
        """Predictions for canvas columns [lo, hi) from `logits` of the columns [first, ...): the outputs at those
        columns, or for a shifted model the outputs one column to the left. When the window starts at lo, `before`
        [B, V] is the output at column lo - 1 (None only where column lo is context, never predicted)."""
        if not self.shifted:
            return logits[:, lo - first : hi - first]
        if lo > first:
            return logits[:, lo - first - 1 : hi - first - 1]
        return read_shifted(logits[:, : hi - lo], before)

    def last_output(self, logits: torch.Tensor) -> torch.Tensor | None:
        """What a shifted model's next block needs from a pass that ends just left of it: its last output [B, V]."""
        return logits[:, -1].clone() if self.shifted else None

    def inputs(self, view: torch.Tensor, start: int) -> torch.Tensor:
        """Model input rows for canvas columns [start, ...) of `view` (doubled for CFG)."""
        return with_unconditional(view, start, self.prompt_width, self.mask_id, self.guided)

    def forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """One counted forward pass (a CFG pair is one batched call)."""
        self.result.nfe += 1
        return self.model(ids, **kwargs)

    def commit(self, logits, view: torch.Tensor, lo: int, hi: int, quota, rows: torch.Tensor | None) -> None:
        """Commit this step's tokens into view[:, lo:hi] in place; `rows`: the view's rows in the batch (None: all)."""
        current = view[:, lo:hi]
        logits = combine_guidance(logits, self.sampler.cfg_scale)
        commit, candidates = _choose_commits(
            logits, current == self.mask_id, self.sampler, quota, self.mask_id, self.generator
        )
        view[:, lo:hi] = torch.where(commit, candidates.to(view.dtype), current)
        counts = commit.sum(1)
        if rows is not None:  # rows that have ended commit 0
            counts = torch.zeros(self.batch, dtype=counts.dtype, device=counts.device).index_copy(0, rows, counts)
        self.result.commits.append(counts)


def end_rows(canvas: torch.Tensor, prompt_width: int, hi: int, eos_id: int) -> torch.Tensor:
    """Rows whose generation up to column `hi` holds an EOS: their rest becomes EOS padding, not worth decoding."""
    ended = (canvas[:, prompt_width:hi] == eos_id).any(1)
    canvas[ended, hi:] = eos_id
    return ended


def pad_finished_rows(generated: torch.Tensor, eos_id: int, mask_id: int) -> None:
    """In place: rows of `generated` [B, n] whose first EOS has no mask before it get EOS in their remaining masks.
    Committed tokens never change, so everything before that EOS is already final text."""
    is_eos = generated == eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), generated.shape[1])
    before = torch.arange(generated.shape[1], device=generated.device)[None, :] < first_eos[:, None]
    finished = is_eos.any(1) & ~((generated == mask_id) & before).any(1)
    generated[finished[:, None] & (generated == mask_id)] = eos_id
