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
from model.tokenizer import mask_token_id
from scripts.common.cli import run_main
from scripts.common.sft import add_sft_flags, run_sft


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_flags(p, run_name="diffusion_sft", epochs=3)
    p.add_argument("--iid-mask-eps", type=float, default=1e-3, help="t ~ U(eps, 1 - eps)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_sft(args, "diffusion", lambda model, batch, rng, tokenizer: llada_sft_loss(
        model, batch["input_ids"], batch["maskable"], rng, mask_token_id(tokenizer), args.iid_mask_eps))


if __name__ == "__main__":
    run_main(main)
