"""Preference optimisation for both routes: the DPO loss (Rafailov et al. 2023, Eq. 7) on answer log-likelihoods,
exact for the AR route and an ELBO estimate for the diffusion route, with LLaDA 1.5's variance reduction (VRPO).

A pair batch holds two rows per pair, the chosen and the rejected conversation, which share their prompt:
"input_ids" [B, 2, T] (PAD on the right), "answer" [B, 2, T] (the tokens of the last assistant turn, through its
<|im_end|>: the only scored tokens) and "length" [B, 2]. Pairs stay on dim 0, so a batch splits over processes
pair by pair.

The diffusion log-likelihood of an answer is LLaDA's SFT ELBO: for a time t ~ U(eps, 1 - eps) each answer token
is masked with probability t, the prompt never, and the masked tokens' log-probs are summed and weighted 1/t
(LLaDA Eq. 5, 1.5's Eq. 2). The DPO score of a pair is a difference of four such estimates, so its variance is
what makes the gradient useful or not. VRPO's three levers, each a field of ElboSampling:
(a) `samples`: the mean of n draws per log-likelihood;
(b) `distinct_times`: those n draws take n timesteps with one mask each, rather than one timestep with n masks;
(c) `antithetic`: the reference model scores the policy's own timesteps and masks, so the log-ratio
    log pi - log pi_ref cancels the noise both share (at initialisation it is exactly 0 for every draw).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.objectives.elbo import masked_nll_sums, pad_to_blocks
from model.objectives.masking import sample_time
from model.tokenizer import EOS_ID

ROUTES = ("ar", "diffusion")


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """DPO loss of pairs from answer log-likelihoods [B, 2] (column 0 chosen, 1 rejected), and its statistics.

    The implicit reward of an answer is beta * (log pi - log pi_ref); the loss is -log sigmoid(reward margin),
    ln 2 when policy = reference. Accuracy counts pairs whose chosen answer has the larger reward, a tie as half
    (at initialisation every margin is 0, and the accuracy 0.5 says the model does not prefer either yet)."""
    rewards = beta * (policy.float() - reference.float())
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -F.logsigmoid(margin).mean()
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    stats = {
        "reward_chosen": rewards[:, 0].mean().detach(),
        "reward_rejected": rewards[:, 1].mean().detach(),
        "reward_margin": margin.mean().detach(),
        "accuracy": accuracy.mean(),
    }
    return loss, stats


def ar_answer_log_likelihood(model, input_ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Exact log p(answer | prompt) per row [R] of a causal model (differentiable): the next-token log-probs of the
    answer tokens. Right padding is never scored and a causal model never reads to the right."""
    logits = model(input_ids, attention="causal")[:, :-1].float()
    logp = -F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return torch.where(answer[:, 1:], logp, 0.0).sum(1)


@dataclass(frozen=True)
class ElboSampling:
    """How a diffusion answer log-likelihood is estimated (the VRPO levers (a)-(c) of the module docstring)."""

    samples: int = 8  # (a) draws per log-likelihood
    distinct_times: bool = True  # (b) one timestep per draw; False: one timestep shared by the n masks
    antithetic: bool = True  # (c) the reference scores the policy's timesteps and masks
    eps: float = 1e-3  # t ~ U(eps, 1 - eps), LLaDA's U(0, 1] with finite weights


@dataclass
class MaskDraws:
    """The noise of one estimate: masked [S, R, T] answer positions and the ELBO weights 1/t [S, R]."""

    masked: torch.Tensor
    weights: torch.Tensor


def draw_answer_masks(answer: torch.Tensor, sampling: ElboSampling, generator: torch.Generator) -> MaskDraws:
    """`sampling.samples` masks of the answer positions of rows [R, T], each token masked with its draw's t."""
    S, (R, T) = sampling.samples, answer.shape
    times = sample_time(
        S * R if sampling.distinct_times else R, generator, answer.device, sampling.eps, 1 - sampling.eps
    )
    times = times.view(S, R) if sampling.distinct_times else times.expand(S, R)
    uniform = torch.rand((S, R, T), device=answer.device, generator=generator)
    return MaskDraws((uniform < times[..., None]) & answer, 1 / times.double())


def diffusion_answer_elbo(
    model, input_ids: torch.Tensor, length: torch.Tensor, draws: MaskDraws, mask_id: int, block_size=None
) -> torch.Tensor:
    """ELBO estimate of log p(answer | prompt) per row [R] (differentiable), the mean over the draws.

    Bidirectional models: each row's right padding is hidden as keys. Block models (the block ELBO): padding is
    EOS, the padding block SFT trained with, in the answer's last block and in later blocks that never reach it."""
    S, (R, T) = draws.masked.shape[0], input_ids.shape
    inside = torch.arange(T, device=input_ids.device)[None, :] < length[:, None]
    masked = draws.masked.reshape(S * R, T)
    keys = None
    if block_size is not None:
        clean = input_ids.masked_fill(~inside, EOS_ID).repeat(S, 1)
        clean, masked = pad_to_blocks(clean, masked, block_size)
    else:
        clean = input_ids.repeat(S, 1)
        keys = None if bool(inside.all()) else inside.repeat(S, 1)
    weights = draws.weights.reshape(S * R, 1).expand(masked.shape)
    nll = masked_nll_sums(model, clean, masked, weights, mask_id, block_size, keys)
    return -nll.view(S, R).mean(0).float()


# scorer(model, rows, draws) -> log-likelihood estimate per row; rows: the batch's dict of [R, T] tensors.
Scorer = Callable[[torch.nn.Module, dict, "MaskDraws | None"], torch.Tensor]


def ar_scorer() -> Scorer:
    return lambda model, rows, draws: ar_answer_log_likelihood(model, rows["input_ids"], rows["answer"])


def diffusion_scorer(mask_id: int, block_size: int | None = None) -> Scorer:
    def score(model, rows, draws):
        return diffusion_answer_elbo(model, rows["input_ids"], rows["length"], draws, mask_id, block_size)

    return score


def pair_log_likelihoods(
    policy, reference, batch: dict, scorer: Scorer, sampling: ElboSampling | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) answer log-likelihoods [B, 2] of a pair batch; the reference without gradient.
    sampling None: an exact scorer (AR), no mask draws."""
    B = batch["input_ids"].shape[0]
    rows = {key: value.flatten(0, 1) for key, value in batch.items()}
    draws = None if sampling is None else draw_answer_masks(rows["answer"], sampling, generator)
    policy_ll = scorer(policy, rows, draws)
    if sampling is not None and not sampling.antithetic:
        draws = draw_answer_masks(rows["answer"], sampling, generator)  # fresh noise: the log-ratio keeps all of it
    with torch.no_grad():
        reference_ll = scorer(reference, rows, draws)
    return policy_ll.view(B, 2), reference_ll.view(B, 2)


@dataclass
class DPOObjective:
    """The DPO loss of a pair batch for the one training loop (the loss_fn of scripts/common/training/trainer.py)."""

    reference: torch.nn.Module  # frozen: the starting checkpoint
    scorer: Scorer
    beta: float = 0.1
    sampling: ElboSampling | None = None  # None for the exact AR route

    def __call__(self, model, batch: dict, generator: torch.Generator, step=None) -> tuple[torch.Tensor, dict]:
        policy_ll, reference_ll = pair_log_likelihoods(
            model, self.reference, batch, self.scorer, self.sampling, generator
        )
        loss, stats = dpo_loss(policy_ll, reference_ll, self.beta)
        return loss, {name: value.item() for name, value in stats.items()}


@torch.no_grad()
def preference_score_spread(objective: DPOObjective, policy, batch: dict, redraws: int = 64, seed: int = 0) -> float:
    """The standard deviation of the estimated preference score (log-ratio of the chosen answer minus that of the
    rejected one) over `redraws` independent draws of the noise, averaged over the pairs of a fixed batch."""
    scores = []
    for draw in range(redraws):
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(seed * 100_003 + draw)
        policy_ll, reference_ll = pair_log_likelihoods(
            policy, objective.reference, batch, objective.scorer, objective.sampling, generator
        )
        ratio = (policy_ll - reference_ll).double()
        scores.append(ratio[:, 0] - ratio[:, 1])
    return torch.stack(scores).std(0).mean().item()
