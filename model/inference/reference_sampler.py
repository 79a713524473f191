"""LLaDA's sampler as one flat loop, to read against the paper (LLaDA, Algorithm 5 and Appendix B.3), and the pieces of
its step, which the fast samplers are built from (model/inference/remasking.py, sampling.py).

The canvas is the prompt followed by gen_length masks. The generation is cut into blocks decoded left to right
(semi-autoregressive); a block gets steps / blocks forward passes, and at each one every masked position of the
block is predicted, but only the quota of the noise schedule (LLaDA's linear one by default) is committed: the most
confident predictions (low-confidence remasking) or random ones. Committed tokens never change. With cfg_scale w,
each step also runs the canvas with the prompt masked and mixes the two as u + (w + 1)(c - u) (unsupervised
classifier-free guidance). A prompt-causal model (model/prompt_causal.py) reads the canvas under its mask: the
prompt causally.

`model.inference.sampling.diffusion_generate` runs the same step with what makes decoding fast or stop early (exact
and approximate K/V caches, confidence thresholds, rows leaving the batch at EOS, left padding, block-causal models)
and is tested to give these very tokens wherever both apply (tests/test_reference_sampler.py).
"""

from __future__ import annotations

import torch

from model.logit_shift import is_shifted, read_shifted
from model.prompt_causal import is_prompt_causal, prompt_causal_mask

REMASKINGS = ("low_confidence", "random")  # a step commits its most confident masked positions, or any


def with_unconditional(view: torch.Tensor, start: int, prompt_len: int, mask_id: int, guided: bool) -> torch.Tensor:
    """Model input rows for canvas columns [start, ...); with CFG, stacked with a copy whose prompt is hidden."""
    if not guided:
        return view
    unconditional = view.clone()
    unconditional[:, : max(0, prompt_len - start)] = mask_id
    return torch.cat([view, unconditional])


def combine_guidance(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """u + (w + 1)(c - u) for logits stacked [conditional; unconditional]; unchanged (as float) when w = 0."""
    if cfg_scale == 0:
        return logits.float()
    cond, uncond = logits.float().chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def sample_tokens(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    """Greedy at temperature 0; else Gumbel-max in float64: argmax(l/T + g) is an exact sample from softmax(l/T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float64, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def confidences(logits: torch.Tensor, tokens: torch.Tensor, remasking: str, generator) -> torch.Tensor:
    """How sure the step is of each token: its probability (low-confidence remasking), or a random score."""
    if remasking == "low_confidence":
        return logits.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return torch.rand(tokens.shape, device=tokens.device, generator=generator)


def commit_top(scores: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Boolean [B, N]: the `quota[b]` highest-scoring positions of each row (scores of -inf never chosen)."""
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (ranks < quota[:, None]) & torch.isfinite(scores)


@torch.no_grad()
def reference_generate(model, prompt: torch.Tensor, sampler, mask_id: int, generator=None) -> torch.Tensor:
    """sampler.gen_length new tokens [B, gen_length] after `prompt` [B, P], for a DiffusionSamplerConfig that uses
    none of the fast-decoding options (threshold, caches, block-causal decoding, early stops)."""
    assert sampler.threshold is None and sampler.cache == "none" and not sampler.block_causal, "not in the reference"
    assert sampler.lookahead_blocks is None and not sampler.finish_at_eos, "not in the reference"
    B, P = prompt.shape
    canvas = torch.cat([prompt, prompt.new_full((B, sampler.gen_length), mask_id)], dim=1)
    block_size = sampler.block_size or sampler.gen_length
    num_blocks = sampler.gen_length // block_size
    for k in range(num_blocks):
        lo, hi = P + k * block_size, P + (k + 1) * block_size
        block_steps = sampler.steps // num_blocks + (k < sampler.steps % num_blocks)
        # [B, steps]: how many tokens each step commits; LLaDA's linear schedule splits the count evenly
        quotas = sampler.schedule.step_quotas((canvas[:, lo:hi] == mask_id).sum(1), block_steps)
        for step in range(block_steps):
            quota = quotas[:, step]
            if not quota.any():
                continue  # a step that commits nothing needs no forward pass
            # 1. predict every position: the model's logits, guided by the prompt-less canvas if cfg_scale > 0
            rows = with_unconditional(canvas, 0, P, mask_id, sampler.cfg_scale > 0)
            attention = prompt_causal_mask(P, canvas.shape[1]) if is_prompt_causal(model) else "bidirectional"
            logits = combine_guidance(model(rows, attention=attention), sampler.cfg_scale)
            if is_shifted(model):  # a converted model predicts column j at column j - 1
                logits = read_shifted(logits)
            logits = logits[:, lo:hi]
            logits[..., mask_id] = float("-inf")  # <|mask|> is never a prediction
            # 2. a token for each position, and how sure of it the step is
            tokens = sample_tokens(logits, sampler.temperature, generator)
            confidence = confidences(logits, tokens, sampler.remasking, generator)
            # 3. commit the quota of most confident masked positions; committed positions stay as they are
            masked = canvas[:, lo:hi] == mask_id
            commit = commit_top(confidence.masked_fill(~masked, float("-inf")), quota)
            canvas[:, lo:hi] = torch.where(commit, tokens.to(canvas.dtype), canvas[:, lo:hi])
    return canvas[:, P:]
