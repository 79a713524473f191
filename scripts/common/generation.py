"""Timed generation for both routes with token-accurate counts, shared by the SFT evals and the server.

Counts are counts of generated token ids (never re-tokenised text, old bug B10). AR decodes with its KV
cache; diffusion reports forward passes (NFE) and the time of its first denoising round. `ar_answers` and
`diffusion_answers` decode many prompts in batches (left-padded, model/padding.py); the times of an answer are
then those of its batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, replace

import torch

from model.ar import generate, generate_batch
from model.block_diffusion import trained_block_size
from model.padding import left_pad
from model.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.tokenizer import EOS_ID, PAD_ID, decode, mask_token_id
from scripts.common.packing import chunks
from scripts.common.trainer import autocast


@dataclass
class Answer:
    text: str
    ids: list[int]  # generated ids up to (not including) EOS
    seconds: float
    first_seconds: float  # AR: time to first token; diffusion: time to the end of the first denoising round
    forward_passes: int
    batch: int = 1  # decoded in a batch of this many prompts: seconds and forward passes are the batch's

    @property
    def tokens_per_second(self) -> float:
        return len(self.ids) / max(self.seconds, 1e-9)

    def stats(self) -> dict:
        out = asdict(self)
        out.pop("text"), out.pop("ids")
        return {
            "new_tokens": len(self.ids),
            **out,
            "tokens_per_s": self.tokens_per_second,
            "tokens_per_forward": len(self.ids) / max(self.forward_passes, 1),
        }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ar_answer(
    model,
    tokenizer,
    prompt: list[int],
    max_new_tokens: int,
    device,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> Answer:
    generator = torch.Generator(device=device).manual_seed(seed)
    ids, first = [], None
    _sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        for token in generate(
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            EOS_ID,
            banned_ids=(mask_token_id(tokenizer),),
            generator=generator,
        ):
            first = first if first is not None else time.perf_counter() - start
            ids.append(token)
    _sync(device)
    elapsed = time.perf_counter() - start
    kept = strip_after_eos(ids, EOS_ID)
    return Answer(decode(tokenizer, kept), kept, elapsed, first or elapsed, len(ids))


class _ForwardClock:
    """Counts a model's forward passes and notes when the first one ended (time to first token / round)."""

    def __init__(self, model, device):
        self.device, self.calls, self.first = device, 0, None
        self.hook = model.register_forward_hook(self._seen)
        _sync(device)
        self.start = time.perf_counter()

    def _seen(self, module, inputs, output) -> None:
        self.calls += 1
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter() - self.start

    def stop(self) -> float:
        self.hook.remove()
        _sync(self.device)
        return time.perf_counter() - self.start


def _timed(model, device, dtype: str, run):
    """(run()'s result under autocast, wall seconds, the clock with its forward count and first-pass time)."""
    clock = _ForwardClock(model, device)
    try:
        with autocast(device, dtype):
            out = run()
    finally:
        elapsed = clock.stop()
    return out, elapsed, clock


def ar_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    device,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: str = "bfloat16",
    batch_size: int = 16,
) -> list[Answer]:
    """Answers to many prompts, `batch_size` at a time through one KV cache per batch (batch 1: ar_answer)."""
    if batch_size <= 1:
        return [
            ar_answer(model, tokenizer, p, max_new_tokens, device, temperature, top_k, top_p, seed, dtype)
            for p in prompts
        ]
    answers = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        generator = torch.Generator(device=device).manual_seed(seed)
        rows, elapsed, clock = _timed(
            model,
            device,
            dtype,
            lambda: generate_batch(
                model,
                chunk,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                EOS_ID,
                banned_ids=(mask_token_id(tokenizer),),
                pad_id=PAD_ID,
                generator=generator,
            ),
        )
        for ids in rows:
            kept = strip_after_eos(ids, EOS_ID)
            answers.append(
                Answer(decode(tokenizer, kept), kept, elapsed, clock.first or elapsed, clock.calls, len(chunk))
            )
    return answers


def diffusion_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampler: DiffusionSamplerConfig,
    device,
    seed: int = 0,
    dtype: str = "bfloat16",
    batch_size: int = 16,
) -> list[Answer]:
    """Answers to many prompts, `batch_size` at a time on one left-padded canvas (block-causal models batch prompts
    of equal length: their blocks are aligned to the prompt's start). Batch 1: diffusion_answer."""
    if batch_size <= 1:
        return [diffusion_answer(model, tokenizer, p, sampler, device, seed, dtype) for p in prompts]
    group = (lambda i: len(prompts[i])) if sampler.block_causal else (lambda i: 0)
    answers = [None] * len(prompts)
    for _, same in itertools.groupby(sorted(range(len(prompts)), key=group), key=group):  # sorted() is stable
        for indices in chunks(same, batch_size):
            ids, lengths = left_pad([prompts[i] for i in indices], PAD_ID, device)
            generator = torch.Generator(device=device).manual_seed(seed)
            out, elapsed, clock = _timed(
                model,
                device,
                dtype,
                lambda: diffusion_generate(
                    model, ids, sampler, mask_token_id(tokenizer), EOS_ID, generator, prompt_lengths=lengths
                ),
            )
            for row, i in enumerate(indices):
                kept = strip_after_eos(out.tokens[row].tolist(), EOS_ID)
                answers[i] = Answer(
                    decode(tokenizer, kept), kept, elapsed, clock.first or elapsed, out.nfe, len(indices)
                )
    return answers


def diffusion_answer(
    model,
    tokenizer,
    prompt: list[int],
    sampler: DiffusionSamplerConfig,
    device,
    seed: int = 0,
    dtype: str = "bfloat16",
    on_block=None,
) -> Answer:
    generator = torch.Generator(device=device).manual_seed(seed)
    out, elapsed, clock = _timed(
        model,
        device,
        dtype,
        lambda: diffusion_generate(  # first forward = first denoising round
            model,
            torch.tensor([prompt], device=device),
            sampler,
            mask_token_id(tokenizer),
            EOS_ID,
            generator,
            on_block=on_block,
        ),
    )
    kept = strip_after_eos(out.tokens[0].tolist(), EOS_ID)
    return Answer(decode(tokenizer, kept), kept, elapsed, clock.first or elapsed, out.nfe)


def as_trained(sampler: DiffusionSamplerConfig, checkpoint) -> DiffusionSamplerConfig:
    """The sampler a checkpoint must be decoded with: block-trained ones (LLaDA 2.0 block SFT or a curriculum's
    block phase) block-causally with their block size, in which every earlier block is final and cached exactly."""
    block = trained_block_size(checkpoint.extra)
    return sampler if block is None else replace(sampler, block_causal=True, block_length=block, cache="none")


def default_block_length(gen_length: int, preferred: int = 32) -> int:
    """Semi-autoregressive blocks of 32 when they tile the canvas (they curb SFT's early-EOS habit), else one block."""
    return preferred if gen_length % preferred == 0 else gen_length
