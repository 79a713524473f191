"""AR pretraining (MiniMind-style causal LM) on packed rows of a jsonl/txt corpus.

uv run python -m scripts.train.train_pretrain --data ./dataset/pretrain_hq.jsonl --jsonl-field text \
    --tokenizer-dir . --run-name minimind_pretrain --max-seq-len 256 --epochs 1 --batch-size 96
"""

from __future__ import annotations

import argparse

import torch

from model.ar import next_token_loss
from model.checkpoint import build_model, read_checkpoint
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import model_config_from_args, pick_device, run_main
from scripts.common.distributed import main_process_first
from scripts.common.evaluation import check_compatible
from scripts.common.pretraining import (
    add_pretraining_flags,
    check_pretraining_flags,
    describe,
    packed_data,
    train_config,
)
from scripts.common.trainer import RunFiles, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pretraining_flags(
        p,
        run_name="minimind_pretrain",
        learning_rate=5e-4,
        lr_schedule="cosine",
        warmup_steps=200,
        min_lr_ratio=0.1,
        batch_size=32,
    )
    p.add_argument(
        "--load-from",
        default=None,
        help="initialise from an AR checkpoint or an official MiniMind2 .pth (its config wins)",
    )
    return p.parse_args(argv)


def initial_model(args, tokenizer, files: RunFiles) -> Transformer:
    """The model to train: from the run's own checkpoint (--resume), from --load-from, or fresh from the flags."""
    source = files.full if args.resume else args.load_from
    if source is None:
        return Transformer(model_config_from_args(args, vocab_size=len(tokenizer)))
    checkpoint = check_compatible(
        read_checkpoint(source),
        source,
        "ar",
        tokenizer,
        args.tokenizer_dir,
        hint="AR pretraining continues only AR checkpoints",
    )
    if not args.resume:
        print(
            f"loaded all {len(checkpoint.state_dict)} tensors from {source} ({checkpoint.source}); config {checkpoint.config}"
        )
    return build_model(checkpoint, source)


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_pretraining_flags(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    with main_process_first():  # under torchrun, rank 0 writes the token cache the others read
        batches, val_batches, steps = packed_data(args, tokenizer)
    cfg = train_config(args, "ar", steps, device)
    model = initial_model(args, tokenizer, RunFiles(cfg))
    print(describe("AR", model, batches, val_batches, steps, device))
    return train(
        model,
        model.config,
        cfg,
        batches.batch,
        val_batches,
        lambda m, batch, rng: next_token_loss(m, batch),
        tokenizer_identity(tokenizer),
        device,
        resume=args.resume,
    )


if __name__ == "__main__":
    run_main(main)
