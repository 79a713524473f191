"""What the two pretraining entry points (AR and diffusion) share: flags, packed data, train config."""

from __future__ import annotations

import argparse

from model.errors import NanoLladaError
from scripts.common.cli import add_model_flags, positive
from scripts.common.packing import PackedBatches, PackedRows, split_train_val, tokenize_to_cache
from scripts.common.trainer import TrainConfig


def add_pretraining_flags(
    p: argparse.ArgumentParser,
    run_name: str,
    learning_rate: float,
    lr_schedule: str,
    warmup_steps: int,
    min_lr_ratio: float,
    batch_size: int,
) -> None:
    p.add_argument(
        "--data",
        default="./dataset/pretrain_hq.jsonl",
        help=".jsonl (one {field: text} per line) or .txt (one document per line)",
    )
    p.add_argument("--jsonl-field", default="text")
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip malformed jsonl lines (counted) instead of stopping"
    )
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--run-name", default=run_name)
    p.add_argument("--save-dir", default="weights")
    p.add_argument("--resume", action="store_true", help="continue <save-dir>/<run-name>.pt where it stopped")
    add_model_flags(p)
    p.add_argument("--max-seq-len", "--seq-len", dest="seq_len", type=int, default=256, help="tokens per packed row")
    p.add_argument(
        "--epochs", type=float, default=1.0, help="passes over the training split (unless --max-iters is given)"
    )
    p.add_argument(
        "--max-iters",
        "--max-steps",
        dest="max_steps",
        type=int,
        default=None,
        help="optimizer steps (default: all epochs)",
    )
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--accumulation-steps", type=int, default=1)
    p.add_argument("--learning-rate", "--lr", type=float, default=learning_rate)
    p.add_argument("--lr-schedule", choices=["cosine", "wsd", "constant"], default=lr_schedule)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument(
        "--lr-stable-ratio", type=float, default=0.4, help="wsd: fraction of steps held at the peak LR after warmup"
    )
    p.add_argument("--min-lr-ratio", type=float, default=min_lr_ratio)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.005,
        help="fraction of tokens (the last documents) held out for validation",
    )
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--save-interval", type=int, default=1000)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument(
        "--early-stop-patience", type=int, default=0, help="evals without improvement before stopping (0 = off)"
    )
    p.add_argument("--early-stop-min-delta", type=float, default=0.0)
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast dtype on CUDA (CPU runs float32)"
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on with CUDA)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=42)


def check_pretraining_flags(args) -> None:
    for name in ("seq_len", "batch_size", "epochs", "accumulation_steps"):
        positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.max_steps is not None:
        positive("--max-iters", args.max_steps)
    if not 0 < args.val_fraction < 0.5:
        raise NanoLladaError(f"--val-fraction must lie in (0, 0.5), got {args.val_fraction}")


def packed_data(args, tokenizer) -> tuple[PackedBatches, list, int]:
    """(training batches, fixed validation batches, number of optimizer steps) for a packed corpus."""
    tokens, doc_ends = tokenize_to_cache(args.data, tokenizer, args.jsonl_field, args.skip_bad_lines)
    train_tokens, val_tokens = split_train_val(tokens, doc_ends, args.val_fraction, args.seq_len)
    batches = PackedBatches(PackedRows(train_tokens, args.seq_len), args.batch_size, args.seed)
    val_rows = PackedRows(val_tokens, args.seq_len)
    n_val = min(val_rows.num_rows, args.eval_batches * args.batch_size)
    val_batches = [val_rows.gather(range(i, min(i + args.batch_size, n_val))) for i in range(0, n_val, args.batch_size)]
    if args.max_steps is not None:
        steps = args.max_steps
    else:
        steps = int(args.epochs * batches.batches_per_epoch) // args.accumulation_steps
    return batches, val_batches, steps


def train_config(args, kind: str, steps: int, device) -> TrainConfig:
    return TrainConfig(
        run_name=args.run_name,
        kind=kind,
        max_steps=steps,
        out_dir=args.save_dir,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        lr_stable_ratio=args.lr_stable_ratio,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        accumulation_steps=args.accumulation_steps,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        save_interval=args.save_interval,
        log_interval=args.log_interval,
        early_stop_patience=args.early_stop_patience,
        early_stop_min_delta=args.early_stop_min_delta,
        dtype=args.dtype,
        compile=device.type == "cuda" if args.compile is None else args.compile,
        seed=args.seed,
    )


def describe(kind: str, model, batches: PackedBatches, val_batches: list, steps: int, device) -> str:
    rows = batches.rows
    return (
        f"{kind} pretraining: {model.num_parameters() / 1e6:.2f}M parameters, {rows.num_rows:,} train rows x {rows.seq_len} tokens, "
        f"{sum(len(b) for b in val_batches)} val rows, {steps} steps of {batches.batch_size} rows on {device}"
    )
