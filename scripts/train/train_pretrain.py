"""AR pretraining (MiniMind-style causal LM) on packed rows of a jsonl/txt corpus.

uv run python -m scripts.train.train_pretrain --data ./dataset/pretrain_hq.jsonl --jsonl-field text \
    --tokenizer-dir . --run-name minimind_pretrain --max-seq-len 256 --epochs 1 --batch-size 96
"""

from __future__ import annotations

import argparse

import torch

from model.ar import next_token_loss
from model.checkpoint import build_model, read_checkpoint
from model.errors import NanoLladaError
from model.tokenizer import check_tokenizer_matches, load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import add_model_flags, model_config_from_args, pick_device, positive, run_main
from scripts.common.packing import PackedBatches, PackedRows, split_train_val, tokenize_to_cache
from scripts.common.trainer import RunFiles, TrainConfig, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="./dataset/pretrain_hq.jsonl", help=".jsonl (one {field: text} per line) or .txt (one document per line)")
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed jsonl lines (counted) instead of stopping")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--run-name", default="minimind_pretrain")
    p.add_argument("--save-dir", default="weights")
    p.add_argument("--load-from", default=None, help="initialise from an AR checkpoint or an official MiniMind2 .pth (its config wins)")
    p.add_argument("--resume", action="store_true", help="continue weights/<run-name>.pt where it stopped")
    add_model_flags(p)
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per packed row")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps (default: all epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", "--lr", type=float, default=5e-4)
    p.add_argument("--lr-schedule", choices=["cosine", "wsd", "constant"], default="cosine")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--lr-stable-ratio", type=float, default=0.4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-fraction", type=float, default=0.005, help="fraction of tokens (last documents) held out for validation")
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-interval", type=int, default=1000)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--early-stop-patience", type=int, default=0)
    p.add_argument("--early-stop-min-delta", type=float, default=0.0)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on with CUDA)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def build_or_load_model(args, tokenizer, files: RunFiles) -> Transformer:
    """The model to train: from the run's own checkpoint (--resume), from --load-from, or fresh from the flags."""
    source = files.full if args.resume else args.load_from
    if source is None:
        return Transformer(model_config_from_args(args, vocab_size=len(tokenizer)))
    checkpoint = read_checkpoint(source)
    if checkpoint.kind != "ar":
        raise NanoLladaError(f"{source}: is a {checkpoint.kind} checkpoint; AR pretraining continues only AR checkpoints")
    check_tokenizer_matches(checkpoint.tokenizer, tokenizer, source, args.tokenizer_dir)
    if checkpoint.config.vocab_size != len(tokenizer):
        raise NanoLladaError(f"{source}: vocab {checkpoint.config.vocab_size} != tokenizer {len(tokenizer)} ({args.tokenizer_dir})")
    model = build_model(checkpoint, source)
    if not args.resume:
        print(f"loaded {len(checkpoint.state_dict)} tensors from {source} ({checkpoint.source}); config {checkpoint.config}")
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    for name in ("max_seq_len", "batch_size", "epochs", "accumulation_steps"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    tokens, doc_ends = tokenize_to_cache(args.data, tokenizer, args.jsonl_field, args.skip_bad_lines)
    train_tokens, val_tokens = split_train_val(tokens, doc_ends, args.val_fraction, args.max_seq_len)
    batches = PackedBatches(PackedRows(train_tokens, args.max_seq_len), args.batch_size, args.seed)
    val_rows = PackedRows(val_tokens, args.max_seq_len)
    val_batches = [val_rows.gather(range(i, min(i + args.batch_size, val_rows.num_rows)))
                   for i in range(0, min(val_rows.num_rows, args.eval_batches * args.batch_size), args.batch_size)]
    steps = int(args.epochs * batches.batches_per_epoch) // args.accumulation_steps
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)

    cfg = TrainConfig(
        run_name=args.run_name, kind="ar", max_steps=steps, out_dir=args.save_dir, learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, lr_stable_ratio=args.lr_stable_ratio,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        accumulation_steps=args.accumulation_steps, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        save_interval=args.save_interval, log_interval=args.log_interval, early_stop_patience=args.early_stop_patience,
        early_stop_min_delta=args.early_stop_min_delta, dtype=args.dtype,
        compile=device.type == "cuda" if args.compile is None else args.compile, seed=args.seed,
    )
    model = build_or_load_model(args, tokenizer, RunFiles(cfg))
    print(f"AR pretraining: {model.num_parameters() / 1e6:.2f}M parameters, {batches.rows.num_rows} train rows x {args.max_seq_len} tokens "
          f"({len(train_tokens):,} tokens), {val_rows.num_rows} val rows, {steps} steps on {device}")
    summary = train(model, model.config, cfg, batches.batch, val_batches, lambda m, batch, rng: next_token_loss(m, batch),
                    tokenizer_identity(tokenizer), device, resume=args.resume)
    print(f"done: step {summary['step']}, best val loss {summary['best_val']:.4f} @ {summary['best_step']}; "
          f"wrote {summary['files']['full']}, {summary['files']['weights']}, {summary['files']['plot']}")
    return summary


if __name__ == "__main__":
    run_main(main)
