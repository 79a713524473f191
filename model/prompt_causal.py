"""A prompt read causally: the attention of prompt-causal diffusion SFT, decoding and likelihoods.

LLaDA's SFT lets every token attend to the whole row, so the prompt's hidden states change with every mask draw of
the answer. A prompt-causal model (ModelConfig.prompt_causal) reads its prompt as an AR model does, each prompt
token seeing only the tokens before it, while every answer token sees the whole prompt and the whole answer. The
prompt's states then depend on the prompt alone: the sampler computes them once and caches them exactly.

For a logit-shifted model (model/logit_shift.py) the first answer token is predicted at the prompt's last position,
whose output no mask draw can touch: its term of the NELBO, E[w(t) 1{masked}] CE = CE, is known exactly and the loss
takes it on every row with weight 1 instead of on the rows that happened to mask it (the same expectation, less
variance). That term is exactly the AR model's log-likelihood of the answer's first token, the one that decides a
short answer.
"""

from __future__ import annotations

import torch

from model.logit_shift import config_of


def is_prompt_causal(model) -> bool:
    """Whether `model` reads its prompt causally (ModelConfig.prompt_causal)."""
    return bool(getattr(config_of(model), "prompt_causal", False))


def answer_starts(answer: torch.Tensor) -> torch.Tensor:
    """The first answer column of each row of a boolean [B, L] answer span ([B]; 0 for a row without one, so the
    whole row is read bidirectionally)."""
    return answer.long().argmax(1)


def prompt_causal_mask(answer_start, length: int, keys: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Boolean attention mask [B or 1, 1, length, length]: a query before its row's `answer_start` (an int or a [B]
    tensor) sees the keys up to itself, a later query sees every key. keys [B, length] (optional): the columns a
    row may attend to at all (padding is not); each query still sees itself, so no softmax row is empty."""
    start = torch.as_tensor(answer_start, device=device if keys is None else keys.device).reshape(-1, 1, 1)
    columns = torch.arange(length, device=start.device)
    query, key = columns[None, :, None], columns[None, None, :]
    mask = (key <= query) | (query >= start)
    if keys is not None:
        mask = (mask & keys[:, None, :]) | (key == query)
    return mask[:, None]


def exact_first_token(answer_start, masked, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, weights) [N, L] with the first answer column of each row that has a prompt (answer_start > 0, an int
    or [N]) scored at weight 1 whether drawn or not: a shifted prompt-causal model's exact term (the module docstring
    says why). The input keeps the draw's masks; only what is scored changes."""
    columns = torch.arange(masked.shape[1], device=masked.device)[None, :]
    start = torch.as_tensor(answer_start, device=masked.device).reshape(-1, 1)
    first = (columns == start) & (start > 0)
    return masked | first, torch.where(first, 1.0, weights.expand(masked.shape))
