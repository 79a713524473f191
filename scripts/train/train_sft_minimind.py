"""AR SFT: next-token loss on every assistant span (content + <|im_end|>), never on prompt or padding.

uv run python -m scripts.train.train_sft_minimind --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/minimind_pretrain_state_dict.pt --run-name minimind_sft --max-seq-len 512 --batch-size 96 --epochs 2
"""

from __future__ import annotations

import argparse

import torch

from model.ar import next_token_loss
from model.tokenizer import load_tokenizer, tokenizer_identity
from scripts.common.cli import pick_device, run_main
from scripts.common.sft import add_sft_flags, initial_sft_model, sft_data, sft_train_config
from scripts.common.trainer import RunFiles, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_flags(p, run_name="minimind_sft", epochs=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    batches, val_batches, steps = sft_data(args, tokenizer, route="ar")
    cfg = sft_train_config(args, "ar", steps)
    model = initial_sft_model(args, tokenizer, "ar", RunFiles(cfg).full)
    print(f"AR SFT: {model.num_parameters() / 1e6:.2f}M parameters, {len(batches.examples)} conversations, "
          f"{sum(len(b['input_ids']) for b in val_batches)} validation, {steps} steps of {args.batch_size} on {device}")
    summary = train(model, model.config, cfg, batches.batch, val_batches,
                    lambda m, batch, rng: next_token_loss(m, batch["input_ids"], batch["labels"]),
                    tokenizer_identity(tokenizer), device, resume=args.resume,
                    tokens_in=lambda batch: int((batch["labels"] != -100).sum()),
                    to_device=lambda batch, dev: {k: v.to(dev, non_blocking=True) for k, v in batch.items()},
                    extra_meta={"sft": {"data": args.data, "load_from": args.load_from}})
    print(f"done: step {summary['step']}, best val loss {summary['best_val']:.4f} @ {summary['best_step']}; "
          f"wrote {summary['files']['full']}, {summary['files']['weights']}, {summary['files']['plot']}")
    return summary


if __name__ == "__main__":
    run_main(main)
