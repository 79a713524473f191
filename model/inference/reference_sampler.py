"""LLaDA's sampler as one flat loop, to read against the paper (LLaDA, Algorithm 5 and Appendix B.3).

The canvas is the prompt followed by gen_length masks. The generation is cut into blocks decoded left to right
(semi-autoregressive); a block gets steps / blocks forward passes, and at each one every masked position of the
block is predicted, but only the quota of the linear schedule is committed: the most confident predictions
(low-confidence remasking) or random ones. Committed tokens never change. With cfg_scale w, each step also runs the
canvas with the prompt masked and mixes the two as u + (w + 1)(c - u) (unsupervised classifier-free guidance).

This is the reference: `model.inference.sampling.diffusion_generate` adds what makes decoding fast or stop early (exact
and approximate K/V caches, confidence thresholds, rows leaving the batch at EOS, left padding, block-causal models) and
is tested to give these very tokens wherever both apply (tests/test_reference_sampler.py).
"""

from __future__ import annotations

import torch

from model.inference.remasking import step_quotas
from model.logit_shift import is_shifted, read_shifted


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
        quotas = step_quotas((canvas[:, lo:hi] == mask_id).sum(1), block_steps)  # [B, steps], LLaDA's schedule
        for step in range(block_steps):
            quota = quotas[:, step]
            if not quota.any():
                continue  # a step that commits nothing needs no forward pass
            # 1. predict every position: the model's logits, guided by the prompt-less canvas if cfg_scale > 0
            if sampler.cfg_scale > 0:
                unconditional = canvas.clone()
                unconditional[:, :P] = mask_id
                conditional, free = model(torch.cat([canvas, unconditional]), attention="bidirectional").chunk(2)
                logits = free.float() + (sampler.cfg_scale + 1) * (conditional.float() - free.float())
            else:
                logits = model(canvas, attention="bidirectional").float()
            if is_shifted(model):  # a converted model predicts column j at column j - 1
                logits = read_shifted(logits)
            logits = logits[:, lo:hi]
            logits[..., mask_id] = float("-inf")  # <|mask|> is never a prediction
            # 2. a token for each position: greedy, or a Gumbel-max sample at the temperature
            if sampler.temperature > 0:
                uniform = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
                gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
                tokens = (logits.double() / sampler.temperature + gumbel).argmax(-1)
            else:
                tokens = logits.argmax(-1)
            # 3. how sure of it: the token's probability, or a random score (random remasking)
            if sampler.remasking == "low_confidence":
                confidence = logits.softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(tokens.shape, generator=generator, device=tokens.device)
            masked = canvas[:, lo:hi] == mask_id
            confidence = confidence.masked_fill(~masked, float("-inf"))  # committed positions stay as they are
            # 4. commit the quota of most confident masked positions, row by row
            for row in range(B):
                chosen = confidence[row].topk(int(quota[row])).indices
                canvas[row, lo + chosen] = tokens[row, chosen].to(canvas.dtype)
    return canvas[:, P:]
