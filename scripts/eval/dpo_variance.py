"""How much each variance-reduction lever of diffusion DPO (LLaDA 1.5's VRPO) steadies the preference score.

On a fixed batch of preference pairs, the estimated preference score of a pair is the policy-over-reference
log-ratio of its chosen answer minus that of its rejected one (the DPO reward margin over beta). This redraws the
timesteps and masks --redraws times and reports the standard deviation of the score per pair, averaged over the
pairs, for each combination of (a) n draws per log-likelihood instead of 1, (b) n timesteps with one mask each
instead of one timestep with n masks, (c) antithetic sampling (the reference scores the policy's own masks), and for
the exact-count estimator (l of the answer's n tokens masked, weight n / l) with and without (d) paired draws (the
rejected answer scored on the chosen answer's masks).
A policy equal to its reference scores exactly 0 with (c); measure a trained policy against its start.

uv run python -m scripts.eval.dpo_variance --policy weights/diffusion_dpo_state_dict.pt \
    --reference weights/diffusion_sft_state_dict.pt --data dataset/sample_dpo_val.jsonl --tokenizer-dir .
"""

from __future__ import annotations

import argparse

from model.objectives.block_curriculum import trained_block_size
from model.objectives.preference import DPOObjective, ElboSampling, diffusion_scorer, preference_score_spread
from model.tokenizer import mask_token_id
from scripts.common.cli import Bounded, pick_device, run_main
from scripts.common.data.pairs import collate_pairs, load_pairs
from scripts.common.evaluation.loading import load_checkpoint_for_eval
from scripts.common.training.prefetch import to_device


def settings(n: int) -> dict[str, ElboSampling]:
    """The table's rows: name -> how each log-likelihood is estimated, from no lever to all of them. The first six
    use the Bernoulli estimator (t ~ U, weight 1 / t), the next two the exact-count one (l of n masked, n / l); the
    last two are the trainer's default before the exact counts and today's."""
    bernoulli = dict(estimator="bernoulli", paired=False)
    return {
        "1 draw, independent reference (none)": ElboSampling(1, True, False, **bernoulli),
        f"{n} draws, one timestep (a)": ElboSampling(n, False, False, **bernoulli),
        f"{n} draws, {n} timesteps (a)+(b)": ElboSampling(n, True, False, **bernoulli),
        "1 draw, antithetic (c)": ElboSampling(1, True, True, **bernoulli),
        f"{n} draws, one timestep, antithetic (a)+(c)": ElboSampling(n, False, True, **bernoulli),
        f"{n} draws, {n} timesteps, antithetic (a)+(b)+(c)": ElboSampling(n, True, True, **bernoulli),
        f"exact count, {n} draws, antithetic (a)+(c)": ElboSampling(n, paired=False),
        f"exact count, {n} draws, antithetic, paired (a)+(c)+(d)": ElboSampling(n),
        "the old default: 8 draws, 8 timesteps, antithetic (a)+(b)+(c)": ElboSampling(8, True, True, **bernoulli),
        f"the default: exact count, {ElboSampling().samples} draws, antithetic"
        + (", paired" if ElboSampling().paired else ""): ElboSampling(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="the trained diffusion checkpoint")
    p.add_argument("--reference", required=True, help="its starting checkpoint (the DPO reference)")
    p.add_argument("--data", required=True, help="preference jsonl; the fixed batch is its --pairs shortest pairs")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--pairs", type=int, action=Bounded, low=1, default=16)
    p.add_argument("--elbo-samples", type=int, action=Bounded, low=1, default=8, help="n of (a)")
    p.add_argument("--redraws", type=int, action=Bounded, low=2, default=64)
    p.add_argument("--max-seq-len", type=int, action=Bounded, low=2, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    policy, tokenizer, checkpoint = load_checkpoint_for_eval(args.policy, args.tokenizer_dir, "diffusion", device)
    reference = load_checkpoint_for_eval(args.reference, args.tokenizer_dir, "diffusion", device)[0]
    examples = load_pairs(args.data, tokenizer, args.max_seq_len)
    # the fixed batch: the pairs with the shortest conversations (ties in file order), cheap to redraw often
    shortest = sorted(range(len(examples)), key=lambda i: max(len(ids) for ids, _ in examples.sides[i]))
    batch = to_device(collate_pairs(examples, sorted(shortest[: args.pairs])), device)
    scorer = diffusion_scorer(mask_token_id(tokenizer), trained_block_size(checkpoint.extra))
    spread = {
        name: preference_score_spread(DPOObjective(reference, scorer, sampling=sampling), policy, batch, args.redraws)
        for name, sampling in settings(args.elbo_samples).items()
    }
    baseline, before = list(spread.values())[0], list(spread.values())[-2]
    print(f"std of the preference score over {args.redraws} redraws, mean over {len(batch['input_ids'])} pairs (nats)")
    print("| estimator | std | vs none | variance vs the old default |\n|---|---:|---:|---:|")
    for name, value in spread.items():
        print(f"| {name} | {value:.3f} | {value / baseline:.3f} | {(value / before) ** 2:.3f} |")
    return {"pairs": len(batch["input_ids"]), "redraws": args.redraws, "std": spread}


if __name__ == "__main__":
    run_main(main)
