"""Likelihoods for both routes, in nats: AR exact log-probs, diffusion Monte-Carlo bounds.

Diffusion bounds come in two estimators of the same NELBO:
- diffusion_nelbo_terms / diffusion_nelbo: LLaDA Eq. 3 (t ~ U, Bernoulli(t) masks weighted 1/t), the training
  loss's own estimator, comparable with AR loss;
- exact mask counts (LLaDA Eq. 14 and Algorithm 3): each draw masks exactly l of the n scored tokens, l uniform
  on 1..n and stratified across draws, and weighs the masked NLL by n / l. Same expectation, much lower variance.
  diffusion_nelbo_rows scores whole rows this way; conditional_log_likelihood(_batch) scores answers after a
  clean prompt (exact for a one-token answer).
A block-diffusion model (BD3LM, LLaDA 2.0) gets the same estimators per block: log p(x) is the sum over blocks of
log p(block | earlier blocks), each block's term bounded within the block (its own count l_b of n_b), every block
in one forward over [x_t ; x_0], so a block sees itself noised and the earlier blocks clean.
A logit-shifted model (model/logit_shift.py) gets every estimator with its predictions read one position to
the left; nothing predicts a row's first token, so it is never scored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from model.block_attention import pad_to_blocks, whole_blocks
from model.logit_shift import is_shifted, predictable
from model.objectives.diffusion_loss import masked_nll_sums
from model.objectives.masking import bernoulli_masks, exact_count_draws, pretraining_maskable, sample_time
from model.objectives.preference import ar_answer_log_likelihood
from model.objectives.schedule import LINEAR
from model.tokenizer import PAD_ID


@torch.no_grad()
def diffusion_nelbo_terms(
    model, input_ids, mask_id, num_samples, generator, eps=1e-3, maskable=None, block_size=None, schedule=LINEAR
) -> torch.Tensor:
    """Per-row Monte-Carlo terms of the NELBO, float64 [num_samples, B]: sum over masked tokens of CE times the
    schedule's ELBO weight (1/t for LLaDA's linear schedule).

    One t ~ U(eps, 1 - eps) and one mask per row and draw (each token masked with probability 1 - alpha(t)); only
    `maskable` positions (default: every non-PAD token) are ever masked, so the others act as context. A term divided
    by the row's maskable count is an unbiased estimate of that row's NELBO per token. block_size: the block NELBO of
    a block-diffusion model.
    """
    maskable = predictable(pretraining_maskable(input_ids) if maskable is None else maskable, is_shifted(model))
    input_ids, maskable = pad_to_blocks(input_ids, maskable, block_size)
    terms = []
    for _ in range(num_samples):
        t = sample_time(input_ids.shape[0], generator, input_ids.device, eps, 1 - eps)
        masked = bernoulli_masks(maskable, schedule.mask_probability(t), generator)
        weights = schedule.elbo_weight(t.double())[:, None].expand(masked.shape)
        terms.append(masked_nll_sums(model, input_ids, masked, weights, mask_id, block_size))
    return torch.stack(terms)


@torch.no_grad()
def diffusion_nelbo(
    model, input_ids, mask_id, num_samples, generator, eps=1e-3, block_size=None, schedule=LINEAR
) -> tuple[float, float]:
    """(mean, standard error) of the per-token NELBO of input_ids [B, L] over num_samples i.i.d. mask draws."""
    maskable = predictable(pretraining_maskable(input_ids), is_shifted(model))
    terms = diffusion_nelbo_terms(
        model, input_ids, mask_id, num_samples, generator, eps, maskable, block_size, schedule
    )
    values = terms.sum(1) / maskable.sum().item()
    stderr = values.std().item() / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return values.mean().item(), stderr


@torch.no_grad()
def diffusion_nelbo_rows(
    model,
    input_ids: torch.Tensor,
    scored: torch.Tensor,
    mask_id: int,
    num_samples: int,
    generator: torch.Generator,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per-row NELBO terms with exact mask counts, float64 [num_samples, B]; unscored positions are clean context.

    Uniform logits give exactly n ln|V| per row for every draw. The draws of a row are stratified, not i.i.d.:
    their spread overstates the Monte-Carlo error of their mean. block_size: the block NELBO of a block-diffusion
    model (rows are right-padded with unscored PAD to a multiple of it; later blocks never reach earlier ones).
    """
    if is_shifted(model) and scored[:, 0].any():
        raise ValueError("position 0 cannot be scored by a logit-shifted model (nothing predicts it)")
    input_ids, scored = pad_to_blocks(input_ids, scored, block_size)
    masked, weights = exact_count_draws(scored, num_samples, generator, block_size)
    terms = [masked_nll_sums(model, input_ids, masked[s], weights[s], mask_id, block_size) for s in range(num_samples)]
    return torch.stack(terms)


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return values.mean().item(), stderr


def _answer_rows(prompt_ids, answer_ids, width, num_samples, generator, block_size, tail_id, mask_id):
    """Clean rows, key masks, masked and weights, all [S, width], of one answer's S draws (over its own length only,
    so the generator calls of an answer do not depend on the other answers)."""
    P, A = len(prompt_ids), len(answer_ids)
    own = whole_blocks(P + A, block_size)
    tail = [mask_id if tail_id is None else tail_id] * (own - P - A)  # rest of the last block: context
    clean = torch.tensor(prompt_ids + answer_ids + tail + [PAD_ID] * (width - own))
    scored = torch.zeros(1, own, dtype=torch.bool)
    scored[0, P : P + A] = True
    exact = bool((scored.view(-1, block_size or own).sum(1) <= 1).all())  # one token per group: one draw is exact
    masked, weights = exact_count_draws(scored, 1 if exact else num_samples, generator, block_size)
    masked, weights = F.pad(masked[:, 0], (0, width - own)), F.pad(weights[:, 0], (0, width - own))
    keys = torch.arange(width) < own
    return clean.expand(len(masked), -1), keys.expand(len(masked), -1), masked, weights


@torch.no_grad()
def conditional_log_likelihood_batch(
    model,
    prompt_ids: list[int],
    answers: list[list[int]],
    mask_id: int,
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    rows_per_forward: int = 32,
    block_size: int | None = None,
    tail_id: int | None = None,
) -> list[tuple[float, float]]:
    """(estimate, standard error) of log p(answer | prompt) for each answer, the prompt never masked (LLaDA
    Algorithm 3; per block for a block-diffusion model). Every (answer, draw) row shares forwards, rows_per_forward
    at a time (logits are rows x (prompt + longest answer) x vocab). Rows are right-padded; padding is masked out
    as keys (bidirectional) or sits in later blocks (block). With one generator, the result for an answer equals
    calling this with that answer alone after the answers before it.

    block_size: the rest of an answer's last block is context holding `tail_id`, by default <|mask|> (unknown: the
    answer may go on); for a complete SFT answer (ending in <|im_end|>) pass EOS, the block-SFT padding it was
    trained with.
    """
    if not prompt_ids and is_shifted(model):
        raise ValueError("a logit-shifted model needs a prompt of at least one token (nothing predicts position 0)")
    device = next(model.parameters()).device
    generator = generator or torch.Generator().manual_seed(0)
    P, longest = len(prompt_ids), max(len(answer) for answer in answers)
    width = whole_blocks(P + longest, block_size)
    parts = [
        _answer_rows(prompt_ids, answer, width, num_samples, generator, block_size, tail_id, mask_id)
        for answer in answers
    ]
    draws = [len(masked) for _, _, masked, _ in parts]
    clean, keys, masked, weights = (torch.cat(rows).to(device) for rows in zip(*parts))
    values = []
    for start in range(0, len(clean), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        row_keys = None if block_size is not None or bool(keys[rows].all()) else keys[rows]
        scored = (clean[rows], masked[rows], weights[rows])
        values.append(-masked_nll_sums(model, *scored, mask_id, block_size, row_keys, answer_start=P))
    return [_mean_and_stderr(chunk) for chunk in torch.cat(values).split(draws)]


def conditional_log_likelihood(model, prompt_ids, answer_ids, mask_id, num_samples=128, **options):
    """conditional_log_likelihood_batch for one answer: (estimate, standard error) of log p(answer | prompt)."""
    return conditional_log_likelihood_batch(model, prompt_ids, [answer_ids], mask_id, num_samples, **options)[0]


def ar_log_likelihood(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """ar_log_likelihood_batch for one answer."""
    return ar_log_likelihood_batch(model, prompt_ids, [answer_ids])[0]


@torch.no_grad()
def ar_log_likelihood_batch(model, prompt_ids: list[int], answers: list[list[int]]) -> list[float]:
    """Exact log p(answer | prompt) under a causal model for each answer, the sum of the answer's next-token
    log-probs; the answers share one forward, and right padding is harmless because a causal model never looks to the
    right of the position it predicts from."""
    device = next(model.parameters()).device
    rows = [torch.tensor(prompt_ids + answer, device=device) for answer in answers]
    ids = pad_sequence(rows, batch_first=True, padding_value=PAD_ID)
    lengths = torch.tensor([len(row) for row in rows], device=device)
    logp = F.log_softmax(model(ids, attention="causal")[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    predicted = torch.arange(1, ids.shape[1], device=device)[None, :]  # position of the token logp[:, j] scores
    scored = (predicted >= len(prompt_ids)) & (predicted < lengths[:, None])
    return torch.where(scored, logp, 0.0).sum(1).tolist()


@torch.no_grad()
def ar_nll_rows(model, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Exact per-row sums of -log p(x_j | x_<j) over the scored positions j of input_ids [B, L], float64 [B].

    Position 0 has no left context and cannot be scored; scored[:, 0] must be False.
    """
    if scored[:, 0].any():
        raise ValueError("position 0 cannot be scored by a causal model")
    return -ar_answer_log_likelihood(model, input_ids, scored).double()
