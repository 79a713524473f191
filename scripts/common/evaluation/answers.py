"""Answers scored by their likelihood after a prompt, for both routes (also multiple choice's scorer): the questions
of an SFT file (prompt ids up to the answer), and the gold answer's likelihood per token, AR exact and diffusion the
exact-count bound (LLaDA Algorithm 3; per block for a block-trained model). For long answers, where accuracy means
nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from model.errors import NanoLladaError
from model.inference.likelihood import ar_log_likelihood_batch, conditional_log_likelihood_batch
from model.tokenizer import EOS_ID, chat_text, encode, mask_token_id
from scripts.common.data.readers import BadLineCounter, iter_conversations


def sft_questions(path: str, tokenizer, limit: int | None) -> list[tuple[list[int], str]]:
    """(prompt ids up to the last assistant turn, gold answer) per conversation."""
    bad, out = BadLineCounter(), []
    for turns in iter_conversations(path, bad=bad):
        if turns[-1]["role"] != "assistant":
            bad.add("last turn is not the assistant's answer")
            continue
        prompt = encode(tokenizer, chat_text(tokenizer, turns[:-1], add_generation_prompt=True))
        out.append((prompt, turns[-1]["content"].strip()))
        if limit and len(out) == limit:
            break
    if bad.summary(Path(path)):
        print(bad.summary(Path(path)))
    if not out:
        raise NanoLladaError(f"{path}: no usable questions")
    return out


@torch.no_grad()
def answer_log_likelihoods(
    model,
    tokenizer,
    kind: str,
    prompt: list[int],
    answers: list[list[int]],
    mc_samples: int,
    block_size: int | None = None,
    seed: int = 0,
    tail_id: int | None = EOS_ID,
    rows_per_forward: int = 32,
) -> list[tuple[float, float]]:
    """(log p(answer | prompt), its Monte-Carlo s.e.) of each answer: AR exact (s.e. 0); diffusion the exact-count
    estimate, per block for a block-trained model, the rest of an answer's last block holding `tail_id` (EOS after a
    complete answer, as block SFT pads it; None: <|mask|>, the answer may go on). The mask draws are seeded with
    `seed` for every prompt, so they do not differ between questions or checkpoints."""
    if kind == "ar":
        return [(value, 0.0) for value in ar_log_likelihood_batch(model, prompt, answers)]
    generator = torch.Generator().manual_seed(seed)
    return conditional_log_likelihood_batch(
        model, prompt, answers, mask_token_id(tokenizer), mc_samples, generator, rows_per_forward, block_size, tail_id
    )


@torch.no_grad()
def answer_nll(model, tokenizer, kind: str, items, mc_samples: int, block_size: int | None = None) -> dict:
    """The gold answers' NLL (answer + <|im_end|>, as SFT trains it) per token, pooled over the items, and the
    per-answer values. Diffusion: an upper bound."""
    totals, tokens = [], []
    for prompt, gold in tqdm(items, desc=f"{kind} answer likelihood", leave=False):
        answer = [*encode(tokenizer, gold), EOS_ID]
        totals.append(-answer_log_likelihoods(model, tokenizer, kind, prompt, [answer], mc_samples, block_size)[0][0])
        tokens.append(len(answer))
    return {
        "nll_per_token": sum(totals) / sum(tokens),
        "answers": len(items),
        "tokens": sum(tokens),
        "answer_nll": totals,
    }
