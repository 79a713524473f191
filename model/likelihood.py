"""Likelihoods for both routes, in nats: AR exact log-probs, diffusion Monte-Carlo bounds.

diffusion_nelbo: per-token negative ELBO of whole sequences (LLaDA Eq. 3 estimator, no forced mask),
  an upper bound on the NLL per token, so it is comparable with AR loss.
conditional_log_likelihood: LLaDA Algorithm 3 for log p(answer | prompt) with stratified mask counts;
  exact for a one-token answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.diffusion import masked_token_nll, pretraining_maskable


@torch.no_grad()
def diffusion_nelbo(model, input_ids: torch.Tensor, mask_id: int, num_samples: int, generator: torch.Generator,
                    eps: float = 1e-3) -> tuple[float, float]:
    """(mean, standard error) of the per-token NELBO of input_ids [B, L] over num_samples i.i.d. mask draws."""
    maskable = pretraining_maskable(input_ids)
    estimates = []
    for _ in range(num_samples):
        t = eps + (1 - 2 * eps) * torch.rand(input_ids.shape[0], device=input_ids.device, generator=generator)
        masked = (torch.rand(input_ids.shape, device=input_ids.device, generator=generator) < t[:, None]) & maskable
        logits = model(input_ids.masked_fill(masked, mask_id), attention="bidirectional")
        nll = masked_token_nll(logits, input_ids, masked)
        estimates.append(((nll / t[:, None]).sum() / maskable.sum()).item())
    values = torch.tensor(estimates, dtype=torch.float64)
    stderr = values.std().item() / math.sqrt(num_samples) if num_samples > 1 else float("nan")
    return values.mean().item(), stderr


def stratified_mask_counts(answer_len: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """LLaDA's stratified draw of how many answer tokens to mask per row: spread evenly over 1..A."""
    k = int(torch.randint(1, answer_len + 1, (1,), generator=generator))
    return torch.tensor([((round(k + i * answer_len / rows) - 1) % answer_len) + 1 for i in range(rows)])


@torch.no_grad()
def conditional_log_likelihood(model, prompt_ids: list[int], answer_ids: list[int], mask_id: int, num_samples: int = 128,
                               batch_size: int = 32, generator: torch.Generator | None = None) -> tuple[float, float]:
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
        counts = stratified_mask_counts(A, rows, generator)
        ranks = torch.rand(rows, A, generator=generator).argsort(1).argsort(1)
        masked_answer = (ranks < counts[:, None]).to(device)
        masked = torch.cat([torch.zeros(rows, P, dtype=torch.bool, device=device), masked_answer], dim=1)
        batch = sequence.expand(rows, -1).masked_fill(masked, mask_id)
        logits = model(batch, attention="bidirectional")
        logp = F.log_softmax(logits[:, P:].float(), -1).gather(-1, sequence[P:].expand(rows, -1)[..., None]).squeeze(-1)
        values.append((logp * masked_answer).sum(1) * (A / counts.to(device)))
    values = torch.cat(values).double()
    stderr = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return values.mean().item(), stderr


@torch.no_grad()
def ar_log_likelihood(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Exact log p(answer | prompt) under a causal model: the sum of next-token log-probs of the answer."""
    device = next(model.parameters()).device
    sequence = torch.tensor([prompt_ids + answer_ids], device=device)
    logp = F.log_softmax(model(sequence, attention="causal")[0, :-1].float(), -1)
    targets = sequence[0, 1:]
    return logp.gather(-1, targets[:, None]).squeeze(-1)[len(prompt_ids) - 1:].sum().item()
