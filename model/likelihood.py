"""Likelihoods for both routes, in nats: AR exact log-probs, diffusion Monte-Carlo bounds.

diffusion_nelbo: per-token negative ELBO of whole sequences (LLaDA Eq. 3 estimator, no forced mask),
  an upper bound on the NLL per token, so it is comparable with AR loss.
conditional_log_likelihood: LLaDA Algorithm 3 for log p(answer | prompt) with stratified mask counts;
  exact for a one-token answer.
Batched variants score many rows or answers per forward (held-out LM comparison, multiple choice):
  diffusion_nelbo_terms (Eq. 3), diffusion_nelbo_rows (Eq. 14, exact mask counts: lower variance) and
  ar_nll_rows give per-row sums, so standard errors can be taken across rows;
  conditional_log_likelihood_batch / ar_log_likelihood_batch score several answers to one prompt at once.
block_conditional_log_likelihood: the same for block-diffusion models (BD3LM, LLaDA 2.0 block SFT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.block_diffusion import bdlm_forward
from model.diffusion import masked_token_nll, pretraining_maskable
from model.tokenizer import PAD_ID


@torch.no_grad()
def diffusion_nelbo_terms(
    model,
    input_ids: torch.Tensor,
    mask_id: int,
    num_samples: int,
    generator: torch.Generator,
    eps: float = 1e-3,
    maskable: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row Monte-Carlo terms of the NELBO, float64 [num_samples, B]: sum over masked tokens of CE / t.

    LLaDA Eq. 3 without the forced mask, one t ~ U(eps, 1 - eps) and one Bernoulli(t) mask per row and draw;
    only `maskable` positions (default: every non-PAD token) are ever masked, so the others act as context.
    A term divided by the row's maskable count is an unbiased estimate of that row's NELBO per token.
    """
    maskable = pretraining_maskable(input_ids) if maskable is None else maskable
    terms = []
    for _ in range(num_samples):
        t = eps + (1 - 2 * eps) * torch.rand(input_ids.shape[0], device=input_ids.device, generator=generator)
        masked = (torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < t[:, None]) & maskable
        logits = model(input_ids.masked_fill(masked, mask_id), attention="bidirectional")
        terms.append((masked_token_nll(logits, input_ids, masked) / t[:, None]).sum(1).double())
    return torch.stack(terms)


@torch.no_grad()
def diffusion_nelbo_rows(
    model, input_ids: torch.Tensor, scored: torch.Tensor, mask_id: int, num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Per-row NELBO terms with exact mask counts, float64 [num_samples, B] (LLaDA Eq. 14, Algorithm 3's form).

    Draw s masks exactly l of row b's n scored positions (uniformly; the rest are context) and scores
    (n / l) * sum of masked CE. Same bound as Eq. 3 in expectation, but l ~ U{1..n} replaces Bernoulli(t) masks
    weighted 1/t, whose variance explodes at small t. Counts are stratified over 1..n across the draws of a row
    (as stratified_mask_counts), so the draws are not i.i.d.: their spread overstates the Monte-Carlo error of
    their mean. Uniform logits give exactly n ln|V| per row, for every draw.
    """
    device = input_ids.device
    n = scored.sum(1)  # [B]
    offset = torch.randint(0, 2**62, (input_ids.shape[0],), device=device, generator=generator) % n.clamp(min=1) + 1
    terms = []
    for sample in range(num_samples):
        # ((round(k + s n / S) - 1) mod n) + 1 with k ~ U{1..n}: the S counts of a row spread evenly over 1..n
        counts = (torch.round(offset + sample * n / num_samples).long() - 1) % n.clamp(min=1) + 1
        scores = torch.rand(input_ids.shape, device=device, generator=generator).masked_fill(~scored, 2.0)
        ranks = scores.argsort(1).argsort(1)
        masked = (ranks < counts[:, None]) & scored
        logits = model(input_ids.masked_fill(masked, mask_id), attention="bidirectional")
        nll = masked_token_nll(logits, input_ids, masked).sum(1).double()
        terms.append(torch.where(n > 0, nll * n / counts, 0.0))
    return torch.stack(terms)


@torch.no_grad()
def diffusion_nelbo(
    model, input_ids: torch.Tensor, mask_id: int, num_samples: int, generator: torch.Generator, eps: float = 1e-3
) -> tuple[float, float]:
    """(mean, standard error) of the per-token NELBO of input_ids [B, L] over num_samples i.i.d. mask draws."""
    maskable = pretraining_maskable(input_ids)
    terms = diffusion_nelbo_terms(model, input_ids, mask_id, num_samples, generator, eps, maskable)
    values = terms.sum(1) / maskable.sum().item()
    stderr = values.std().item() / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return values.mean().item(), stderr


def stratified_mask_counts(answer_len: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """LLaDA's stratified draw of how many answer tokens to mask per row: spread evenly over 1..A."""
    k = int(torch.randint(1, answer_len + 1, (1,), generator=generator))
    return torch.tensor([((round(k + i * answer_len / rows) - 1) % answer_len) + 1 for i in range(rows)])


def draw_answer_masks(answer_len: int, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask counts [rows], masked answer positions [rows, A]): exactly counts[i] positions, uniform without replacement."""
    counts = stratified_mask_counts(answer_len, rows, generator)
    ranks = torch.rand(rows, answer_len, generator=generator).argsort(1).argsort(1)
    return counts, ranks < counts[:, None]


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return values.mean().item(), stderr


@torch.no_grad()
def conditional_log_likelihood(
    model,
    prompt_ids: list[int],
    answer_ids: list[int],
    mask_id: int,
    num_samples: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(estimate, standard error) of log p(answer | prompt) for a bidirectional masked-diffusion model.

    Each row masks exactly l answer positions (l stratified over 1..A), never the prompt, and scores
    (A / l) * sum of masked log-probs. A one-token answer needs a single forward and is exact.
    """
    device = next(model.parameters()).device
    generator = generator or torch.Generator().manual_seed(0)
    A, P = len(answer_ids), len(prompt_ids)
    num_samples = 1 if A == 1 else num_samples
    sequence = torch.tensor(prompt_ids + answer_ids, device=device)
    values = []
    for start in range(0, num_samples, batch_size):
        rows = min(batch_size, num_samples - start)
        counts, masked_answer = draw_answer_masks(A, rows, generator)
        masked_answer = masked_answer.to(device)
        masked = torch.cat([torch.zeros(rows, P, dtype=torch.bool, device=device), masked_answer], dim=1)
        batch = sequence.expand(rows, -1).masked_fill(masked, mask_id)
        logits = model(batch, attention="bidirectional")
        logp = F.log_softmax(logits[:, P:].float(), -1).gather(-1, sequence[P:].expand(rows, -1)[..., None]).squeeze(-1)
        values.append((logp * masked_answer).sum(1) * (A / counts.to(device)))
    return _mean_and_stderr(torch.cat(values))


def _right_padded(sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, T] right-padded with PAD, lengths [N])."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    ids = torch.full((len(sequences), int(lengths.max())), PAD_ID, dtype=torch.long, device=device)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)] = torch.tensor(sequence, device=device)
    return ids, lengths


@torch.no_grad()
def conditional_log_likelihood_batch(
    model,
    prompt_ids: list[int],
    answers: list[list[int]],
    mask_id: int,
    num_samples: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    rows_per_forward: int | None = None,
) -> list[tuple[float, float]]:
    """conditional_log_likelihood for several answers to one prompt, every (answer, sample) row sharing forwards.

    The masks of each answer are drawn exactly as conditional_log_likelihood draws them (same generator calls,
    stratified in groups of batch_size, answers in order), so with one generator the results equal calling it
    for each answer in turn. Rows are right-padded with PAD to the longest answer and, when lengths differ, a
    key-padding mask keeps every row from attending to padding, so padding changes nothing. rows_per_forward
    (default: all rows at once) bounds memory: logits are rows x (prompt + longest answer) x vocab.
    """
    device = next(model.parameters()).device
    generator = generator or torch.Generator().manual_seed(0)
    P, longest = len(prompt_ids), max(len(answer) for answer in answers)
    targets, masked, weights, owner = [], [], [], []  # one entry per row, answers padded to `longest`
    for index, answer in enumerate(answers):
        A = len(answer)
        draws = 1 if A == 1 else num_samples
        for start in range(0, draws, batch_size):
            counts, masked_answer = draw_answer_masks(A, min(batch_size, draws - start), generator)
            rows = len(counts)
            targets.append(F.pad(torch.tensor(answer), (0, longest - A), value=PAD_ID).expand(rows, -1))
            masked.append(F.pad(masked_answer, (0, longest - A), value=False))
            weights.append(A / counts.double())
            owner.append(torch.full((rows,), index))
    prompt = torch.tensor(prompt_ids).expand(sum(len(w) for w in weights), -1)
    targets = torch.cat([prompt, torch.cat(targets)], dim=1).to(device)
    masked = torch.cat([torch.zeros_like(prompt, dtype=torch.bool), torch.cat(masked)], dim=1).to(device)
    weights, owner = torch.cat(weights).to(device), torch.cat(owner).to(device)
    lengths = P + torch.tensor([len(answer) for answer in answers], device=device)[owner]
    valid = torch.arange(P + longest, device=device)[None, :] < lengths[:, None]
    noisy = targets.masked_fill(masked, mask_id)
    step = rows_per_forward or len(noisy)
    values = []
    for start in range(0, len(noisy), step):
        rows = slice(start, start + step)
        attention = "bidirectional" if bool(valid[rows].all()) else valid[rows, None, None, :]  # keys only
        logp = F.log_softmax(model(noisy[rows], attention=attention)[:, P:].float(), -1)
        logp = logp.gather(-1, targets[rows, P:, None]).squeeze(-1)
        values.append(torch.where(masked[rows, P:], logp, 0.0).sum(1).double() * weights[rows])
    values = torch.cat(values)
    return [_mean_and_stderr(values[owner == index]) for index in range(len(answers))]


@torch.no_grad()
def block_conditional_log_likelihood(
    model,
    prompt_ids: list[int],
    answer_ids: list[int],
    mask_id: int,
    block_size: int,
    num_samples: int = 128,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    tail_id: int | None = None,
) -> tuple[float, float]:
    """(estimate, standard error) of log p(answer | prompt) for a block-diffusion model.

    Blocks start at position 0, as in training and block-causal decoding. log p(answer | prompt) is the sum over
    blocks b of log p(answer tokens of b | everything before b), and each term gets Algorithm 3's bound within
    its block: per draw, l_b of the block's A_b answer tokens (l_b stratified over 1..A_b) are masked and scored
    with weight A_b / l_b; every block in one forward over [x_t ; x_0] with the BD3LM mask, so a block sees itself
    noised and the earlier blocks clean. The rest of the last block (after the answer) is never scored; it holds
    `tail_id`, by default <|mask|> (unknown: the answer may go on). For a complete SFT answer (one that ends in
    <|im_end|>) pass EOS: block SFT pads every answer's last block with EOS, so that is the context it was trained in.
    Exact when no block holds more than one answer token.
    """
    device = next(model.parameters()).device
    generator = generator or torch.Generator().manual_seed(0)
    P, A = len(prompt_ids), len(answer_ids)
    L = -(-(P + A) // block_size) * block_size
    clean = torch.tensor(
        prompt_ids + answer_ids + [mask_id if tail_id is None else tail_id] * (L - P - A), device=device
    )
    block_of = torch.arange(P, P + A) // block_size
    groups = [P + (block_of == b).nonzero().flatten() for b in block_of.unique()]  # answer columns of each block
    num_samples = 1 if all(len(cols) == 1 for cols in groups) else num_samples
    values = []
    for start in range(0, num_samples, batch_size):
        rows = min(batch_size, num_samples - start)
        masked = torch.zeros(rows, L, dtype=torch.bool)
        weights = torch.zeros(rows, L, dtype=torch.float64)
        for cols in groups:
            counts, chosen = draw_answer_masks(len(cols), rows, generator)
            masked[:, cols], weights[:, cols] = chosen, (len(cols) / counts.double())[:, None]
        masked, weights = masked.to(device), weights.to(device)
        batch = clean.expand(rows, -1)
        logits = bdlm_forward(model, batch.masked_fill(masked, mask_id), batch, block_size)
        logp = F.log_softmax(logits.float(), -1).gather(-1, batch[..., None]).squeeze(-1)
        values.append((torch.where(masked, logp, 0.0).double() * weights).sum(1))
    return _mean_and_stderr(torch.cat(values))


@torch.no_grad()
def ar_log_likelihood(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Exact log p(answer | prompt) under a causal model: the sum of next-token log-probs of the answer."""
    device = next(model.parameters()).device
    sequence = torch.tensor([prompt_ids + answer_ids], device=device)
    logp = F.log_softmax(model(sequence, attention="causal")[0, :-1].float(), -1)
    targets = sequence[0, 1:]
    return logp.gather(-1, targets[:, None]).squeeze(-1)[len(prompt_ids) - 1 :].sum().item()


@torch.no_grad()
def ar_log_likelihood_batch(model, prompt_ids: list[int], answers: list[list[int]]) -> list[float]:
    """ar_log_likelihood for several answers to one prompt in one forward; right padding is harmless because
    a causal model never looks to the right of the position it predicts from."""
    device = next(model.parameters()).device
    ids, lengths = _right_padded([prompt_ids + answer for answer in answers], device)
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
    logits = model(input_ids, attention="causal")[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return torch.where(scored[:, 1:], nll, 0.0).sum(1).double()
