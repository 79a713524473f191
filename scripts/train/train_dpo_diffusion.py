"""Diffusion DPO with LLaDA 1.5's variance reduction (VRPO): each log-likelihood of DPO is a bound of the answer's
ELBO given the clean prompt (the block ELBO for a block-trained checkpoint), by default the evaluations' exact-count
bound: --elbo-samples draws, each masking exactly l of the answer's n tokens (l stratified over the draws, weight
n / l), the reference scoring the policy's own masks and the rejected answer the chosen one's
(model/objectives/preference.py).

uv run python -m scripts.train.train_dpo_diffusion --data dataset/dpo.jsonl --tokenizer-dir . \
    --load-from weights/diffusion_sft_state_dict.pt --run-name diffusion_dpo --max-seq-len 512 --batch-size 8
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.objectives.preference import ESTIMATORS, DPOObjective, ElboSampling, diffusion_scorer
from model.tokenizer import mask_token_id
from scripts.common.cli import parse, run_main
from scripts.common.settings import add_flags, flag, settings_from
from scripts.common.training.dpo import dpo_parser, dpo_settings, run_dpo


@dataclass
class SamplingFlags:
    """The estimator's flags: ElboSampling's fields, by the names the command line has always used (levers a-d)."""

    elbo_samples: int = flag(ElboSampling.samples, "(a) mask draws per log-likelihood estimate", low=1)
    distinct_times: bool = flag(
        ElboSampling.distinct_times,
        "(b) bernoulli: one timestep per draw (off: one timestep shared by the draws' masks)",
        kind=bool,
    )
    antithetic: bool = flag(
        ElboSampling.antithetic, "(c) the reference scores the policy's timesteps and masks (off: its own)", kind=bool
    )
    paired: bool = flag(
        ElboSampling.paired, "(d) the rejected answer takes the chosen answer's draws (off: its own)", kind=bool
    )
    elbo_estimator: str = flag(
        ElboSampling.estimator,
        "exact_count: l of n answer tokens masked, weight n / l; bernoulli: t ~ U, weight 1 / t",
        choices=ESTIMATORS,
    )
    iid_mask_eps: float = flag(ElboSampling.eps, "bernoulli: t ~ U(eps, 1 - eps)")

    def sampling(self) -> ElboSampling:
        if not 0 < self.iid_mask_eps < 0.5:
            raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {self.iid_mask_eps}")
        return ElboSampling(
            self.elbo_samples, self.distinct_times, self.antithetic, self.iid_mask_eps, self.elbo_estimator, self.paired
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = dpo_parser(__doc__, run_name="diffusion_dpo")
    add_flags(p.add_argument_group("variance reduction (LLaDA 1.5 VRPO)"), SamplingFlags)
    return parse(p, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sampling = settings_from(SamplingFlags, args).sampling()
    flags = dpo_settings(args, "diffusion")

    def objective(reference, checkpoint, tokenizer):
        scorer = diffusion_scorer(mask_token_id(tokenizer), trained_block_size(checkpoint.extra))
        return DPOObjective(reference, scorer, flags.own.terms(), sampling)

    def meta(checkpoint) -> dict:  # a block-trained model stays one: its evals decode block-causally
        block_size = trained_block_size(checkpoint.extra)
        return {
            "elbo_sampling": asdict(sampling),
            **({"block_diffusion": {"block_size": block_size}} if block_size else {}),
        }

    return run_dpo(flags, objective, extra_meta=meta)


if __name__ == "__main__":
    run_main(main)
