"""What the speed card says about the content a decoder wrote (the ids before the first EOS, all that a speed figure
counts), computed on the decoded ids, never on a reference: its generative perplexity under the pair's AR model (that
model's own NLL) and its unigram entropy (repetition drives it towards 0 while keeping perplexity low)."""

import math
from collections import Counter

import torch

from model.inference.likelihood import ar_nll_rows


@torch.no_grad()
def generative_nll(ar_model, prompts: list[list[int]], outputs: list[list[int]]) -> tuple[float, int]:
    """(total NLL in nats, tokens scored) of every non-empty output after its prompt under `ar_model`: exact
    next-token log-likelihoods, one forward pass per (prompt, output) pair."""
    device = next(ar_model.parameters()).device
    total, count = 0.0, 0
    for prompt, output in (pair for pair in zip(prompts, outputs) if pair[1]):
        ids = torch.tensor([prompt + output], device=device)
        scored = torch.arange(ids.shape[1], device=device)[None] >= len(prompt)
        total, count = total + float(ar_nll_rows(ar_model, ids, scored)[0]), count + len(output)
    return total, count


def generative_perplexity(ar_model, prompts: list[list[int]], outputs: list[list[int]]) -> float | None:
    """exp(NLL per token) of the outputs under the AR model, pooled over tokens; None when nothing was written."""
    total, count = generative_nll(ar_model, prompts, outputs)
    return math.exp(total / count) if count else None


def unigram_entropy(ids: list[int]) -> float:
    """Entropy in nats of the token histogram of one output (0 for an output of one repeated token, or empty)."""
    p = torch.tensor(list(Counter(ids).values()), dtype=torch.float64) / max(len(ids), 1)
    return 0.0 - float((p * p.log()).sum())


def mean_unigram_entropy(outputs: list[list[int]]) -> float | None:
    """unigram_entropy averaged over the non-empty outputs; None when every output is empty."""
    written = [ids for ids in outputs if ids]
    return sum(map(unigram_entropy, written)) / len(written) if written else None
