"""Diffusion SFT (LLaDA): the prompt is never masked; answer tokens and their EOS padding are masked with
t ~ U(eps, 1-eps) and the loss is normalised by each sample's answer length.

Multi-turn rows: every assistant turn is a target at once (user/system turns are the clean prompt), so the
model learns p(all answers | all user turns); the last turn of a chat at inference is the single-turn case.

uv run python -m scripts.train.train_sft_diffusion --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/diffusion_from_ar_eq3_best.pt --run-name diffusion_sft --max-seq-len 512 --batch-size 96 --epochs 3
"""

from __future__ import annotations

import argparse

from model.diffusion import llada_sft_loss
from model.errors import NanoLladaError
from model.llada2_sft import block_sft_loss
from model.tokenizer import mask_token_id
from scripts.common.cli import run_main
from scripts.common.sft import add_sft_flags, run_sft


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_flags(p, run_name="diffusion_sft", epochs=3)
    p.add_argument("--iid-mask-eps", type=float, default=1e-3, help="t ~ U(eps, 1 - eps)")
    llada2 = p.add_argument_group("LLaDA 2.0 SFT options (model/llada2_sft.py)")
    llada2.add_argument(
        "--block-size", type=int, default=None, help="block-diffusion SFT with this block size (BD3LM mask)"
    )
    llada2.add_argument("--mask-ratio-min", type=float, default=None, help="mask-ratio bandwidth: t ~ U(min, max)")
    llada2.add_argument("--mask-ratio-max", type=float, default=None)
    llada2.add_argument(
        "--complementary-masking", action="store_true", help="each sample twice: a mask and its complement"
    )
    llada2.add_argument(
        "--cap-weight", type=float, default=0.0, help="weight of the confidence-aware (CAP) auxiliary loss"
    )
    llada2.add_argument("--time-weight-schedule", choices=["linear", "cosine"], default="linear")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_min = args.iid_mask_eps if args.mask_ratio_min is None else args.mask_ratio_min
    t_max = 1 - args.iid_mask_eps if args.mask_ratio_max is None else args.mask_ratio_max
    if not 0 < t_min < t_max < 1:
        raise NanoLladaError(f"mask-ratio band must satisfy 0 < min < max < 1, got {t_min}, {t_max}")
    if args.block_size is not None and args.block_size <= 0:
        raise NanoLladaError(f"--block-size must be > 0, got {args.block_size}")
    llada2 = (
        args.block_size is not None
        or args.complementary_masking
        or args.cap_weight > 0
        or args.time_weight_schedule != "linear"
        or args.mask_ratio_min is not None
        or args.mask_ratio_max is not None
    )
    if not llada2:
        return run_sft(
            args,
            "diffusion",
            lambda model, batch, rng, tokenizer: llada_sft_loss(
                model, batch["input_ids"], batch["maskable"], rng, mask_token_id(tokenizer), args.iid_mask_eps
            ),
        )

    def loss(model, batch, rng, tokenizer):
        return block_sft_loss(
            model,
            batch["input_ids"],
            batch["maskable"],
            rng,
            mask_token_id(tokenizer),
            args.block_size,
            (t_min, t_max),
            args.time_weight_schedule,
            args.complementary_masking,
            args.cap_weight,
        )

    # A block-trained model decodes block-causally with an exact cache (scripts.eval.eval_diffusion reads this).
    meta = {"block_diffusion": {"block_size": args.block_size}} if args.block_size else {}
    return run_sft(args, "diffusion", loss, extra_meta=meta)


if __name__ == "__main__":
    run_main(main)
