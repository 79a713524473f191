"""Preference optimisation for both routes: the DPO loss (Rafailov et al. 2023, Eq. 7) on answer log-likelihoods,
exact for the AR route and an ELBO estimate for the diffusion route, with LLaDA 1.5's variance reduction (VRPO).

A pair batch holds two rows per pair, the chosen and the rejected conversation, which share their prompt:
"input_ids" [B, 2, T] (PAD on the right), "answer" [B, 2, T] (the tokens of the last assistant turn, through its
<|im_end|>: the only scored tokens) and "length" [B, 2]. Pairs stay on dim 0, so a batch splits over processes
pair by pair.

DPO alone pushes both answers down when they differ in a token or two (likelihood displacement: the mass goes to
what neither answer says, technical_report.md 7.5). PreferenceLoss holds the terms that keep the chosen answer up,
each a flag of both entry points: an NLL term on the chosen answer (RPO, Pang et al. 2024), DPOP's floor on the
chosen log-ratio (Pal et al. 2024), IPO's squared loss (Azar et al. 2023) and SimPO's length normalisation,
reference-free reward and target margin (Meng et al. 2024).

The diffusion log-likelihood of an answer is a bound of LLaDA's SFT ELBO, the prompt never masked. Two estimators
(ElboSampling.estimator): "exact_count" (default; LLaDA Eq. 14, the evaluations' bound): a draw masks exactly l of
the answer's n tokens, l uniform on 1..n and stratified over the draws, weighted n / l (per block for a block
model); "bernoulli" (LLaDA Eq. 5, 1.5's Eq. 2): t ~ U(eps, 1 - eps), each answer token masked with probability t,
weighted 1 / t. The DPO score of a pair is a difference of four such estimates, so its variance is what makes the
gradient useful or not. The levers, each a field of ElboSampling:
(a) `samples`: the mean of n draws per log-likelihood;
(b) `distinct_times` (bernoulli only): n timesteps with one mask each, rather than one timestep with n masks;
(c) `antithetic`: the reference model scores the policy's own masks, so the log-ratio log pi - log pi_ref cancels
    the noise both share (at initialisation it is exactly 0 for every draw);
(d) `paired`: the rejected answer takes the chosen answer's draws (the same count or time and the same positions,
    counted from the answer's start), so the noise of the two answers' shared tokens cancels in the score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.block_attention import pad_to_blocks, whole_blocks
from model.errors import NanoLladaError
from model.objectives.diffusion_loss import masked_nll_sums
from model.objectives.masking import exact_count_draws, mask_exactly, stratified_counts
from model.objectives.schedule import LINEAR, NoiseSchedule, check_schedule
from model.prompt_causal import answer_starts
from model.tokenizer import EOS_ID

LOSS_TYPES = ("sigmoid", "ipo")
ESTIMATORS = ("exact_count", "bernoulli")


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss of a pair from its answers' log-likelihoods under the policy (pi) and the reference (pi_ref).

    With r = log pi - log pi_ref of an answer (divided by its token count if length_normalized; log pi alone if
    reference_free), z = r_chosen - r_rejected - chosen_floor * max(0, -r_chosen), the loss of a pair is
    -log sigmoid(beta z - target_margin) ("sigmoid", DPO) or (z - 1 / (2 beta))^2 ("ipo"), plus
    nll_weight * -log pi(chosen) / (its token count)."""

    beta: float = 0.1  # DPO temperature: the implicit reward of an answer is beta * r
    loss_type: str = "sigmoid"  # "sigmoid": DPO; "ipo": IPO's squared distance of z to 1 / (2 beta)
    nll_weight: float = 1.0  # RPO: weight of the chosen answer's NLL per token (length-normalised)
    chosen_floor: float = 0.0  # DPOP's lambda: penalises the chosen answer falling below the reference
    length_normalized: bool = False  # SimPO: each answer's r per token
    reference_free: bool = False  # SimPO: r = log pi alone (the reference only measures the drift)
    target_margin: float = 0.0  # SimPO's gamma: the sigmoid asks for beta z > gamma

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise NanoLladaError(f"loss type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def preference_loss(
    policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor, terms: PreferenceLoss
) -> tuple[torch.Tensor, dict]:
    """The loss of pairs from answer log-likelihoods [B, 2] (column 0 chosen, 1 rejected) and answer token counts
    [B, 2], and its statistics. Plain DPO (no NLL, no floor) is ln 2 when policy = reference. Accuracy counts pairs
    whose chosen answer has the larger reward, a tie as half (at initialisation every margin is 0)."""
    policy, reference, lengths = policy.float(), reference.float(), lengths.float()
    drift = policy - reference  # log pi - log pi_ref, nats
    ratio = policy if terms.reference_free else drift
    ratio = ratio / lengths if terms.length_normalized else ratio
    floor = terms.chosen_floor * (-drift[:, 0]).clamp(min=0)
    floor = floor / lengths[:, 0] if terms.length_normalized else floor
    z = ratio[:, 0] - ratio[:, 1] - floor
    if terms.loss_type == "ipo":
        loss = (z - 1 / (2 * terms.beta)) ** 2
    else:
        loss = -F.logsigmoid(terms.beta * z - terms.target_margin)
    chosen_nll = -policy[:, 0] / lengths[:, 0]
    loss = (loss + terms.nll_weight * chosen_nll).mean()
    rewards = terms.beta * ratio
    margin = rewards[:, 0] - rewards[:, 1]
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    stats = {
        "reward_chosen": rewards[:, 0].mean(),
        "reward_rejected": rewards[:, 1].mean(),
        "reward_margin": margin.mean(),
        "accuracy": accuracy.mean(),
        "chosen_drift": drift[:, 0].mean(),  # nats the chosen answer gained on the reference (< 0: lost)
        "rejected_drift": drift[:, 1].mean(),
        "chosen_drift_per_token": (drift[:, 0] / lengths[:, 0]).mean(),
        "chosen_nll_per_token": chosen_nll.mean(),
    }
    return loss, {name: value.detach() for name, value in stats.items()}


def ar_answer_log_likelihood(model, input_ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Exact log p(answer | prompt) per row [R] of a causal model (differentiable): the next-token log-probs of the
    answer tokens. Right padding is never scored and a causal model never reads to the right."""
    logits = model(input_ids, attention="causal")[:, :-1].float()
    logp = -F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return torch.where(answer[:, 1:], logp, 0.0).sum(1)


@dataclass(frozen=True)
class ElboSampling:
    """How a diffusion answer log-likelihood is estimated (the estimator and levers (a)-(d) of the module docstring)."""

    samples: int = 4  # (a) draws per log-likelihood (4 exact counts: half the old default's variance, report 7.5)
    distinct_times: bool = True  # (b) bernoulli: one timestep per draw; False: one timestep shared by the n masks
    antithetic: bool = True  # (c) the reference scores the policy's masks
    eps: float = 1e-3  # bernoulli: t ~ U(eps, 1 - eps), LLaDA's U(0, 1] with finite weights
    estimator: str = "exact_count"  # "exact_count" (LLaDA Eq. 14) or "bernoulli" (Eq. 5)
    paired: bool = False  # (d) the rejected answer takes the chosen answer's draws (no gain measured: off)
    schedule: NoiseSchedule = LINEAR  # bernoulli: each answer token masked with probability 1 - alpha(t)

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise NanoLladaError(f"ELBO estimator {self.estimator!r}: choose one of {', '.join(ESTIMATORS)}")
        check_schedule(self.schedule)
        if self.schedule != LINEAR and self.estimator != "bernoulli":
            name = self.schedule.name
            raise NanoLladaError(f"{name} schedule: the exact-count draw takes no time, so it has no schedule")


class MaskDraws(NamedTuple):
    """The noise of one estimate: masked [S, R, T] answer positions and their ELBO weights [S, R, T]."""

    masked: torch.Tensor
    weights: torch.Tensor


def _pair_noise(shape: tuple, rows: int, paired: bool, generator, device) -> torch.Tensor:
    """Uniform noise [*shape] over rows (dim 1); paired: rows 2i and 2i + 1 (a pair's chosen and rejected) equal."""
    if not paired:
        return torch.rand(shape, device=device, generator=generator)
    half = torch.rand((shape[0], rows // 2, *shape[2:]), device=device, generator=generator)
    return half.repeat_interleave(2, dim=1)


def draw_answer_masks(
    answer: torch.Tensor, sampling: ElboSampling, generator: torch.Generator, block_size: int | None = None
) -> MaskDraws:
    """`sampling.samples` masks of the answer positions of rows [R, T]. Paired (rows are a batch's chosen/rejected
    pairs, flattened): position j of a row reads the noise at j - (its answer's start), the count or time is the
    pair's, so two answers of one length get the same masks. Block models: exact counts per block, unpaired."""
    S, (R, T), device = sampling.samples, answer.shape, answer.device
    if sampling.estimator == "exact_count" and block_size is not None:
        padded = F.pad(answer, (0, whole_blocks(T, block_size) - T))
        masked, weights = exact_count_draws(padded, S, generator, block_size)
        return MaskDraws(masked[..., :T], weights[..., :T])
    paired = sampling.paired and R % 2 == 0
    start = answer_starts(answer)
    offsets = (torch.arange(T, device=device)[None, :] - start[:, None]) % T  # j - start, wrapped
    uniform = _pair_noise((S, R, T), R, paired, generator, device).gather(2, offsets.expand(S, R, T))
    if sampling.estimator == "exact_count":
        n = answer.sum(1)  # [R]
        counts = stratified_counts(n, S, None, offset=_pair_noise((1, R), R, paired, generator, device)[0].double())
        masked = mask_exactly(answer.expand(S, R, T), counts, None, noise=uniform)
        weights = n.double() / counts.clamp(min=1)
    else:
        times = _pair_noise((S if sampling.distinct_times else 1, R), R, paired, generator, device)
        times = (sampling.eps + (1 - 2 * sampling.eps) * times).expand(S, R)
        masked = (uniform < sampling.schedule.mask_probability(times)[..., None]) & answer
        weights = sampling.schedule.elbo_weight(times.double())
    return MaskDraws(masked, weights[..., None].expand(S, R, T))


def diffusion_answer_elbo(
    model, input_ids, length: torch.Tensor, draws: MaskDraws, mask_id: int, block_size=None, answer_start=0
) -> torch.Tensor:
    """ELBO estimate of log p(answer | prompt) per row [R] (differentiable), the mean over the draws.

    Bidirectional models: each row's right padding is hidden as keys. Block models (the block ELBO): padding is
    EOS, the padding block SFT trained with, in the answer's last block and in later blocks that never reach it.
    answer_start [R]: where each row's answer begins (a prompt-causal model reads the prompt before it causally)."""
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
    weights = draws.weights.reshape(S * R, T)
    weights = F.pad(weights, (0, masked.shape[1] - T))  # block padding: never masked, never weighted
    starts = answer_start.repeat(S) if torch.is_tensor(answer_start) else answer_start
    nll = masked_nll_sums(model, clean, masked, weights, mask_id, block_size, keys, starts)
    return -nll.view(S, R).mean(0).float()


# scorer(model, rows, draws) -> log-likelihood estimate per row; rows: the batch's dict of [R, T] tensors.
Scorer = Callable[[torch.nn.Module, dict, "MaskDraws | None"], torch.Tensor]


def ar_scorer() -> Scorer:
    return lambda model, rows, draws: ar_answer_log_likelihood(model, rows["input_ids"], rows["answer"])


@dataclass(frozen=True)
class DiffusionScorer:
    """The diffusion route's Scorer; a block model's (block_size) exact counts are drawn per block."""

    mask_id: int
    block_size: int | None = None

    def __call__(self, model, rows: dict, draws: MaskDraws) -> torch.Tensor:
        starts = answer_starts(rows["answer"])
        return diffusion_answer_elbo(
            model, rows["input_ids"], rows["length"], draws, self.mask_id, self.block_size, starts
        )


def diffusion_scorer(mask_id: int, block_size: int | None = None) -> Scorer:
    return DiffusionScorer(mask_id, block_size)


def pair_log_likelihoods(
    policy, reference, batch: dict, scorer: Scorer, sampling: ElboSampling | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) answer log-likelihoods [B, 2] of a pair batch; the reference without gradient.
    sampling None: an exact scorer (AR), no mask draws."""
    B = batch["input_ids"].shape[0]
    rows = {key: value.flatten(0, 1) for key, value in batch.items()}
    block_size = getattr(scorer, "block_size", None)
    draws = None if sampling is None else draw_answer_masks(rows["answer"], sampling, generator, block_size)
    policy_ll = scorer(policy, rows, draws)
    if sampling is not None and not sampling.antithetic:  # fresh noise: the log-ratio keeps all of it
        draws = draw_answer_masks(rows["answer"], sampling, generator, block_size)
    with torch.no_grad():
        reference_ll = scorer(reference, rows, draws)
    return policy_ll.view(B, 2), reference_ll.view(B, 2)


@dataclass
class DPOObjective:
    """The preference loss of a pair batch for the one training loop (the loss_fn of
    scripts/common/training/trainer.py)."""

    reference: torch.nn.Module  # frozen: the starting checkpoint
    scorer: Scorer
    terms: PreferenceLoss = PreferenceLoss()
    sampling: ElboSampling | None = None  # None for the exact AR route

    def __call__(self, model, batch: dict, generator: torch.Generator, step=None) -> tuple[torch.Tensor, dict]:
        policy_ll, reference_ll = pair_log_likelihoods(
            model, self.reference, batch, self.scorer, self.sampling, generator
        )
        lengths = batch["answer"].sum(-1)
        loss, stats = preference_loss(policy_ll, reference_ll, lengths, self.terms)
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
