"""Timed generation for both routes with token-accurate counts, shared by the SFT evals (eval_sft_one_prompt,
eval_sft_accuracy).

Counts are counts of generated token ids, never of re-tokenised text (decoding and encoding again does not give
the same ids back). AR decodes with its KV cache; diffusion reports forward passes (NFE) and the time of its first
denoising round. Many prompts decode in batches (left-padded, model/inference/padding.py); the times of an answer are
then those of its batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace

import torch

from model.inference.ar import ARSamplerConfig, generate, generate_batch
from model.inference.padding import left_pad
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.tokenizer import EOS_ID, PAD_ID, decode, mask_token_id
from scripts.common.data.packing import chunks
from scripts.common.device import autocast, synchronize

GREEDY = ARSamplerConfig()


@dataclass
class Answer:
    text: str
    ids: list[int]  # generated ids up to (not including) EOS
    seconds: float
    first_seconds: float  # AR: time to first token; diffusion: time to the end of the first denoising round
    forward_passes: int
    batch: int = 1  # decoded in a batch of this many prompts: seconds and forward passes are the batch's

    def stats(self) -> dict:
        out = asdict(self)
        out.pop("text"), out.pop("ids")
        return {
            "new_tokens": len(self.ids),
            **out,
            "tokens_per_s": len(self.ids) / max(self.seconds, 1e-9),
            "tokens_per_forward": len(self.ids) / max(self.forward_passes, 1),
        }


class ForwardClock:
    """Counts a model's forward passes and notes when the first one ended (time to first token / round)."""

    def __init__(self, model, device):
        self.device, self.calls, self.first = device, 0, None
        self.hook = model.register_forward_hook(self._seen)
        synchronize(device)
        self.start = time.perf_counter()

    def _seen(self, module, inputs, output) -> None:
        self.calls += 1
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter() - self.start

    def stop(self) -> float:
        self.hook.remove()
        synchronize(self.device)
        return time.perf_counter() - self.start


def _timed_answers(model, tokenizer, device, dtype: str, run) -> list[Answer]:
    """Run `run()` (a batch's generated ids, one list per prompt) under autocast and a clock; one Answer per row,
    with the batch's time and forward passes (every sampler calls the model once per forward pass it counts)."""
    clock = ForwardClock(model, device)
    try:
        with autocast(device, dtype):
            rows = run()
    finally:
        elapsed = clock.stop()
    kept = [strip_after_eos(ids, EOS_ID) for ids in rows]
    return [
        Answer(decode(tokenizer, ids), ids, elapsed, clock.first or elapsed, clock.calls, len(rows)) for ids in kept
    ]


def ar_answers(
    model, tokenizer, prompts, max_new_tokens: int, device, sampler=GREEDY, seed=0, dtype="bfloat16", batch_size=16
) -> list[Answer]:
    """Answers to many prompts (lists of ids), `batch_size` at a time through one KV cache per batch; `sampler`: how
    each token is drawn (greedy by default; <|mask|> is never drawn)."""
    sampler = replace(sampler, banned_ids=(mask_token_id(tokenizer),))
    answers = []
    for chunk in chunks(prompts, max(batch_size, 1)):
        generator = torch.Generator(device=device).manual_seed(seed)
        if len(chunk) == 1:  # one prompt needs no padding
            run = lambda: [list(generate(model, chunk[0], max_new_tokens, sampler, EOS_ID, generator=generator))]
        else:
            run = lambda: generate_batch(
                model, chunk, max_new_tokens, sampler, EOS_ID, pad_id=PAD_ID, generator=generator
            )
        answers += _timed_answers(model, tokenizer, device, dtype, run)
    return answers


def diffusion_answers(
    model, tokenizer, prompts: list, sampler: DiffusionSamplerConfig, device, seed=0, dtype="bfloat16", batch_size=16
) -> list[Answer]:
    """Answers to many prompts (lists of ids), `batch_size` at a time on one left-padded canvas (block-causal models
    batch prompts of equal length: their blocks are aligned to the prompt's start), in the prompts' order."""
    group = (lambda i: len(prompts[i])) if sampler.block_causal else (lambda i: 0)
    answers = [None] * len(prompts)
    for _, same in itertools.groupby(sorted(range(len(prompts)), key=group), key=group):  # sorted() is stable
        for indices in chunks(same, max(batch_size, 1)):
            ids, lengths = left_pad([prompts[i] for i in indices], PAD_ID, device)
            generator = torch.Generator(device=device).manual_seed(seed)
            run = lambda: diffusion_generate(
                model, ids, sampler, mask_token_id(tokenizer), EOS_ID, generator, prompt_lengths=lengths
            ).tokens.tolist()
            for i, answer in zip(indices, _timed_answers(model, tokenizer, device, dtype, run)):
                answers[i] = answer
    return answers


def default_block_size(gen_length: int) -> int:
    """Semi-autoregressive blocks of 32 when they tile the canvas (they curb SFT's early-EOS habit), else one block."""
    return 32 if gen_length % 32 == 0 else gen_length
