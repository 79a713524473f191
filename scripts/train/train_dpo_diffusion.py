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
from dataclasses import asdict

from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.objectives.preference import ESTIMATORS, DPOObjective, ElboSampling, diffusion_scorer
from model.tokenizer import mask_token_id
from scripts.common.cli import Bounded, parse, run_main
from scripts.common.training.dpo import dpo_parser, dpo_settings, run_dpo


def parse_args(argv=None) -> argparse.Namespace:
    p = dpo_parser(__doc__, run_name="diffusion_dpo")
    vrpo = p.add_argument_group("variance reduction (LLaDA 1.5 VRPO)")
    vrpo.add_argument(
        "--elbo-samples",
        type=int,
        action=Bounded,
        low=1,
        default=ElboSampling().samples,
        help="(a) mask draws per log-likelihood estimate",
    )
    vrpo.add_argument(
        "--distinct-times",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(b) bernoulli: one timestep per draw (off: one timestep shared by the draws' masks)",
    )
    vrpo.add_argument(
        "--antithetic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(c) the reference scores the policy's timesteps and masks (off: its own draws)",
    )
    vrpo.add_argument(
        "--paired",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="(d) the rejected answer takes the chosen answer's draws (off: its own)",
    )
    vrpo.add_argument(
        "--elbo-estimator",
        choices=ESTIMATORS,
        default="exact_count",
        help="exact_count: l of n answer tokens masked, weight n / l; bernoulli: t ~ U, weight 1 / t",
    )
    vrpo.add_argument("--iid-mask-eps", type=float, default=1e-3, help="bernoulli: t ~ U(eps, 1 - eps)")
    return parse(p, argv)


def sampling_of(args) -> ElboSampling:
    if args.elbo_samples < 1:
        raise NanoLladaError(f"--elbo-samples must be >= 1, got {args.elbo_samples}")
    if not 0 < args.iid_mask_eps < 0.5:
        raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {args.iid_mask_eps}")
    return ElboSampling(
        args.elbo_samples, args.distinct_times, args.antithetic, args.iid_mask_eps, args.elbo_estimator, args.paired
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    sampling = sampling_of(args)
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
