"""Diffusion SFT (LLaDA): the prompt is never masked; answer tokens and their EOS padding are masked with
t ~ U(eps, 1-eps) and the loss is normalised by each sample's answer length.

Multi-turn rows: every assistant turn is a target at once (user/system turns are the clean prompt), so the
model learns p(all answers | all user turns); the last turn of a chat at inference is the single-turn case.

uv run python -m scripts.train.train_sft_diffusion --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/diffusion_from_ar_eq3_best.pt --run-name diffusion_sft --max-seq-len 512 --batch-size 96 --epochs 3
"""

from __future__ import annotations

import argparse

import torch

from model.diffusion import llada_sft_loss
from model.tokenizer import load_tokenizer, mask_token_id, tokenizer_identity
from scripts.common.cli import pick_device, run_main
from scripts.common.sft import add_sft_flags, initial_sft_model, sft_data, sft_train_config
from scripts.common.trainer import RunFiles, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_flags(p, run_name="diffusion_sft", epochs=3)
    p.add_argument("--iid-mask-eps", type=float, default=1e-3, help="t ~ U(eps, 1 - eps)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    batches, val_batches, steps = sft_data(args, tokenizer, route="diffusion")
    cfg = sft_train_config(args, "diffusion", steps)
    model = initial_sft_model(args, tokenizer, "diffusion", RunFiles(cfg).full)
    mask_id = mask_token_id(tokenizer)
    print(f"diffusion SFT: {model.num_parameters() / 1e6:.2f}M parameters, {len(batches.examples)} conversations, "
          f"{sum(len(b['input_ids']) for b in val_batches)} validation, {steps} steps of {args.batch_size} on {device}")
    summary = train(model, model.config, cfg, batches.batch, val_batches,
                    lambda m, batch, rng: llada_sft_loss(m, batch["input_ids"], batch["maskable"], rng, mask_id, args.iid_mask_eps),
                    tokenizer_identity(tokenizer), device, resume=args.resume,
                    tokens_in=lambda batch: batch["input_ids"].numel(),
                    to_device=lambda batch, dev: {k: v.to(dev, non_blocking=True) for k, v in batch.items()},
                    extra_meta={"sft": {"data": args.data, "load_from": args.load_from}})
    print(f"done: step {summary['step']}, best val loss {summary['best_val']:.4f} @ {summary['best_step']}; "
          f"wrote {summary['files']['full']}, {summary['files']['weights']}, {summary['files']['plot']}")
    return summary


if __name__ == "__main__":
    run_main(main)
