"""The noise schedule of masked diffusion: one object that the loss, the likelihoods, DPO's scores and the sampler take.

alpha(t) is the probability that a token is still clean at time t in [0, 1] (alpha(0) = 1, alpha(1) = 0):
- linear (LLaDA): alpha = 1 - t, so the mask ratio is t and the ELBO weight 1/t;
- cosine: alpha = cos^2(pi t / 2), mask ratio sin^2(pi t / 2), ELBO weight pi cot(pi t / 2).

The continuous-time NELBO does not depend on the schedule (MDLM: a change of variable in t), so in training and in
the likelihoods the schedule changes an estimate's variance, not what it estimates. In the sampler it decides how
many tokens each of S equal time steps from t = 1 down to 0 commits: about n (alpha(t_k) - alpha(t_k-1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.errors import NanoLladaError, SettingError

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class NoiseSchedule:
    name: str = "linear"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise NanoLladaError(f"unknown noise schedule '{self.name}'; use one of {', '.join(SCHEDULES)}")

    def clean_probability(self, t: torch.Tensor) -> torch.Tensor:
        """alpha(t)."""
        return 1 - t if self.name == "linear" else torch.cos(math.pi * t / 2) ** 2

    def mask_probability(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha(t): the probability that a token is masked at time t."""
        return t if self.name == "linear" else torch.sin(math.pi * t / 2) ** 2

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), the continuous-time ELBO weight (MDLM Eq. 10) at the t that masked a row.
        E[weight * P(masked)] = 1 for t ~ U(0, 1), so uniform logits score ln|V| per token under either schedule."""
        return 1.0 / t if self.name == "linear" else math.pi / torch.tan(math.pi * t / 2)

    def step_quotas(self, masked_count: torch.Tensor, steps: int) -> torch.Tensor:
        """How many of each row's masked positions each of `steps` sampling steps commits, int64 [B, steps], every
        row summing to its count. linear: LLaDA's even split, larger quotas first. Otherwise the steps run at equal
        time intervals from t = 1 to 0 and commit the rounded growth of masked_count * alpha(t)."""
        if self.name == "linear":
            base = masked_count[:, None] // steps
            extra = torch.arange(steps, device=masked_count.device)[None, :] < (masked_count % steps)[:, None]
            return base + extra.long()
        times = 1 - torch.arange(steps + 1, device=masked_count.device, dtype=torch.float64) / steps
        revealed = (masked_count[:, None].double() * self.clean_probability(times)[None, :]).round().long()
        return revealed.diff(dim=1)


LINEAR = NoiseSchedule()


def check_schedule(value) -> None:
    """Refuse a schedule given by name (or anything else): entry points make the object once, from their flag."""
    if not isinstance(value, NoiseSchedule):
        raise SettingError(f"{{schedule}} must be a model.objectives.schedule.NoiseSchedule, got {value!r}")
