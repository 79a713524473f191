"""Timed generation for both routes with token-accurate counts, shared by the SFT evals and the server.

Counts are counts of generated token ids (never re-tokenised text, old bug B10). AR decodes with its KV
cache; diffusion reports forward passes (NFE) and the time of its first denoising round.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from model.ar import generate
from model.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.tokenizer import EOS_ID, decode, mask_token_id
from scripts.common.trainer import autocast


@dataclass
class Answer:
    text: str
    ids: list[int]  # generated ids up to (not including) EOS
    seconds: float
    first_seconds: float  # AR: time to first token; diffusion: time to the end of the first denoising round
    forward_passes: int

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / max(self.seconds, 1e-9)

    def stats(self) -> dict:
        out = asdict(self)
        out.pop("text"), out.pop("ids")
        return {"new_tokens": len(self.ids), **out, "tokens_per_s": self.tokens_per_second,
                "tokens_per_forward": len(self.ids) / max(self.forward_passes, 1)}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ar_answer(model, tokenizer, prompt: list[int], max_new_tokens: int, device, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, seed: int = 0, dtype: str = "bfloat16") -> Answer:
    generator = torch.Generator(device=device).manual_seed(seed)
    ids, first = [], None
    _sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        for token in generate(model, prompt, max_new_tokens, temperature, top_k, top_p, EOS_ID,
                              banned_ids=(mask_token_id(tokenizer),), generator=generator):
            first = first if first is not None else time.perf_counter() - start
            ids.append(token)
    _sync(device)
    elapsed = time.perf_counter() - start
    kept = strip_after_eos(ids, EOS_ID)
    return Answer(decode(tokenizer, kept), kept, elapsed, first or elapsed, len(ids))


def diffusion_answer(model, tokenizer, prompt: list[int], sampler: DiffusionSamplerConfig, device, seed: int = 0,
                     dtype: str = "bfloat16", on_block=None) -> Answer:
    generator = torch.Generator(device=device).manual_seed(seed)
    first_done = []

    def note_first_round(module, inputs, output) -> None:  # the first forward pass is the first denoising round
        if not first_done:
            _sync(device)
            first_done.append(time.perf_counter())

    hook = model.register_forward_hook(note_first_round)
    _sync(device)
    start = time.perf_counter()
    try:
        with autocast(device, dtype):
            out = diffusion_generate(model, torch.tensor([prompt], device=device), sampler, mask_token_id(tokenizer), EOS_ID,
                                     generator, on_block=on_block)
    finally:
        hook.remove()
    _sync(device)
    elapsed = time.perf_counter() - start
    kept = strip_after_eos(out.tokens[0].tolist(), EOS_ID)
    first = first_done[0] - start if first_done else elapsed
    return Answer(decode(tokenizer, kept), kept, elapsed, first, out.nfe)


def default_block_length(gen_length: int, preferred: int = 32) -> int:
    """Semi-autoregressive blocks of 32 when they tile the canvas (they curb SFT's early-EOS habit), else one block."""
    return preferred if gen_length % preferred == 0 else gen_length
