"""What the two pretraining entry points (AR and diffusion) share: data flags, packed data, the run summary."""

from __future__ import annotations

import argparse

from scripts.common.data.packing import PackedBatches, PackedRows, split_train_val, tokenize_to_cache
from scripts.common.data.readers import BadLine
from scripts.common.training.flags import add_training_flags, optimizer_steps

# Pretraining defaults shared by both routes; each entry point adds its own (run name, batch size, LR ...).
PRETRAINING_DEFAULTS = dict(
    seq_len=256, epochs=1.0, val_fraction=0.005, eval_interval=500, eval_batches=20, save_interval=1000, compile=None
)


def add_pretraining_flags(p: argparse.ArgumentParser, **defaults) -> None:
    """The corpus flags and every training flag; `defaults` are the entry point's own (see add_training_flags)."""
    p.add_argument(
        "--data", default="./dataset/pretrain_hq.jsonl", help=".jsonl ({field: text} rows) or .txt (a document a line)"
    )
    p.add_argument("--jsonl-field", default="text")
    p.add_argument(
        "--skip-bad-lines", action="store_true", help="skip (and count) malformed jsonl lines; default: stop"
    )
    add_training_flags(p, **{**PRETRAINING_DEFAULTS, **defaults})


def packed_data(args, tokenizer) -> tuple[PackedBatches, list, int]:
    """(training batches, fixed validation batches, number of optimizer steps) for a packed corpus."""
    try:
        tokens, doc_ends = tokenize_to_cache(args.data, tokenizer, args.jsonl_field, args.skip_bad_lines)
    except BadLine as err:  # only raised without --skip-bad-lines: say that the flag exists
        raise BadLine(f"{err}; --skip-bad-lines skips (and counts) such lines") from None
    train_tokens, val_tokens = split_train_val(tokens, doc_ends, args.val_fraction, args.seq_len)
    batches = PackedBatches(PackedRows(train_tokens, args.seq_len), args.batch_size, args.seed)
    val_rows = PackedRows(val_tokens, args.seq_len)
    n_val = min(val_rows.num_rows, args.eval_batches * args.batch_size)
    val_batches = [val_rows.gather(range(i, min(i + args.batch_size, n_val))) for i in range(0, n_val, args.batch_size)]
    return batches, val_batches, optimizer_steps(args, batches.batches_per_epoch)


def describe(kind: str, model, batches: PackedBatches, val_batches: list, steps: int, device) -> str:
    rows = batches.rows
    return (
        f"{kind} pretraining: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{rows.num_rows:,} train rows x {rows.seq_len} tokens, "
        f"{sum(len(b) for b in val_batches)} val rows, {steps} steps of {batches.batch_size} rows on {device}"
    )
