"""Diffusion sampling: LLaDA low-confidence remasking with semi-autoregressive blocks, unsupervised CFG,
and confidence-threshold parallel decoding (Fast-dLLM). AR sampling lives in model/ar.py.

The canvas is [prompt, <|mask|> x gen_length]. Blocks are decoded left to right; inside a block each
step runs the model on the whole canvas and commits some masked positions of that block. Committed
tokens never change (absorbing), the prompt never changes, and <|mask|> can never be predicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.errors import NanoLladaError


@dataclass
class DiffusionSamplerConfig:
    gen_length: int
    steps: int  # total forward passes budgeted over all blocks (LLaDA's `steps`)
    block_length: int | None = None  # None: one block covering the whole generation
    temperature: float = 0.0  # Gumbel-max sampling; 0 = greedy
    remasking: str = "low_confidence"  # low_confidence | random
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight w
    threshold: float | None = None  # commit every masked position with confidence >= threshold (at least one)
    stop_at_eos: bool = True  # stop after the block in which every row has produced EOS

    def validate(self) -> None:
        block = self.block_length or self.gen_length
        if self.gen_length <= 0:
            raise NanoLladaError(f"nothing to generate: generation length {self.gen_length}")
        if block <= 0 or self.gen_length % block:
            raise NanoLladaError(f"--block-length {block} does not divide the generation length {self.gen_length}; "
                                 f"choose a divisor of {self.gen_length} (e.g. {self.gen_length}) or change --max-new-tokens")
        if self.threshold is None and self.steps < self.gen_length // block:
            raise NanoLladaError(f"--gen-steps {self.steps} is fewer than the {self.gen_length // block} blocks; use at least one step per block")
        if self.remasking not in ("low_confidence", "random"):
            raise NanoLladaError(f"--remasking must be low_confidence or random, got '{self.remasking}'")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, gen_length] generated ids (EOS-filled after an early stop)
    nfe: int  # model forward passes (a CFG pair counts once: it is one batched call)
    commits: list[torch.Tensor] = field(default_factory=list)  # per step: tokens committed per row


def step_quotas(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's linear schedule: split each row's masked count over `steps` as evenly as possible,
    larger quotas first. Returns [B, steps]; every row sums to its masked count."""
    base = masked_count[:, None] // steps
    extra = torch.arange(steps, device=masked_count.device)[None, :] < (masked_count % steps)[:, None]
    return base + extra.long()


def _sampled_tokens(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # Gumbel-max in float64: argmax(l/T + g) is an exact sample from softmax(l/T).
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float64, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _guided_logits(model, canvas: torch.Tensor, prompt_len: int, mask_id: int, cfg_scale: float) -> torch.Tensor:
    if cfg_scale == 0:
        return model(canvas, attention="bidirectional").float()
    unconditional = canvas.clone()
    unconditional[:, :prompt_len] = mask_id  # LLaDA's unsupervised CFG: the prompt is hidden
    both = model(torch.cat([canvas, unconditional]), attention="bidirectional").float()
    cond, uncond = both.chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _commit_top(scores: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Boolean [B, N]: the `quota[b]` highest-scoring positions of each row (scores of -inf never chosen)."""
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (ranks < quota[:, None]) & torch.isfinite(scores)


@torch.no_grad()
def diffusion_generate(model, prompt: torch.Tensor, cfg: DiffusionSamplerConfig, mask_id: int, eos_id: int | None = None,
                       generator: torch.Generator | None = None,
                       on_block: Callable[[int, torch.Tensor], None] | None = None) -> SampleResult:
    """Generate cfg.gen_length tokens after `prompt` [B, P] (rows of equal length).

    `on_block(k, tokens)` is called after block k is final with that block's ids [B, block] (for streaming).
    """
    cfg.validate()
    B, P = prompt.shape
    block = cfg.block_length or cfg.gen_length
    num_blocks = cfg.gen_length // block
    canvas = torch.cat([prompt, torch.full((B, cfg.gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], dim=1)
    result = SampleResult(canvas[:, P:], 0)
    positions = torch.arange(canvas.shape[1], device=canvas.device)
    for k in range(num_blocks):
        lo, hi = P + k * block, P + (k + 1) * block
        in_block = (positions >= lo) & (positions < hi)
        block_steps = cfg.steps // num_blocks + (k < cfg.steps % num_blocks)
        quotas = step_quotas((canvas[:, lo:hi] == mask_id).sum(1), block_steps) if cfg.threshold is None else None
        step = 0
        while (canvas[:, lo:hi] == mask_id).any():
            if quotas is not None and step >= block_steps:
                break  # cannot happen: quotas sum to the masked count
            quota = quotas[:, step] if quotas is not None else None
            step += 1
            if quota is not None and not quota.any():
                continue  # nothing to commit this step: skip the forward pass
            logits = _guided_logits(model, canvas, P, mask_id, cfg.cfg_scale)
            logits[..., mask_id] = float("-inf")  # the mask token is never a prediction
            result.nfe += 1
            candidates = _sampled_tokens(logits, cfg.temperature, generator)
            if cfg.remasking == "low_confidence":
                confidence = logits.softmax(-1).gather(-1, candidates[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(canvas.shape, device=canvas.device, generator=generator)
            open_here = (canvas == mask_id) & in_block
            scores = confidence.masked_fill(~open_here, float("-inf"))
            if quota is None:  # threshold decoding: everything confident enough, and at least the best one
                commit = open_here & (confidence >= cfg.threshold)
                commit |= _commit_top(scores, open_here.any(1).long()) & ~commit.any(1, keepdim=True)
            else:
                commit = _commit_top(scores, quota)
            canvas = torch.where(commit, candidates.to(canvas.dtype), canvas)
            result.commits.append(commit.sum(1))
        if on_block is not None:
            on_block(k, canvas[:, lo:hi])
        if cfg.stop_at_eos and eos_id is not None and (canvas[:, P:hi] == eos_id).any(1).all():
            canvas[:, hi:] = eos_id  # every row has ended: the rest is EOS padding, not worth decoding
            break
    result.tokens = canvas[:, P:]
    return result


def strip_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS: LLaDA pads the canvas with EOS."""
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
