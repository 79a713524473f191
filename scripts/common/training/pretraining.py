"""What the two pretraining entry points (AR and diffusion) share: data flags, packed data, the run summary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from scripts.common.data.packing import PackedBatches, PackedRows, split_train_val, tokenize_to_cache
from scripts.common.data.readers import BadLine
from scripts.common.settings import add_flags, flag
from scripts.common.training.flags import TrainingFlags, add_training_flags, fixed_batches

# Pretraining defaults shared by both routes; each entry point adds its own (run name, batch size, LR ...).
PRETRAINING_DEFAULTS = dict(
    seq_len=256, epochs=1.0, val_fraction=0.005, eval_interval=500, eval_batches=20, save_interval=1000, compile=None
)


@dataclass
class Corpus:
    """The pretraining corpus flags."""

    data: str = flag("./dataset/pretrain_hq.jsonl", ".jsonl ({field: text} rows) or .txt (a document a line)")
    jsonl_field: str = flag("text", "the field of a jsonl row that holds its text")
    skip_bad_lines: bool = flag(False, "skip (and count) malformed jsonl lines; default: stop")


def add_pretraining_flags(p: argparse.ArgumentParser, **defaults) -> None:
    """The corpus flags and every training flag; `defaults` are the entry point's own (see add_training_flags)."""
    add_flags(p, Corpus)
    add_training_flags(p, **{**PRETRAINING_DEFAULTS, **defaults})


def packed_data(flags: TrainingFlags, tokenizer) -> tuple[PackedBatches, list, int]:
    """(training batches, fixed validation batches, number of optimizer steps) of the corpus `flags.own.corpus`."""
    corpus, run, seed = flags.own.corpus, flags.run, flags.optimizer.seed
    try:
        tokens, doc_ends = tokenize_to_cache(corpus.data, tokenizer, corpus.jsonl_field, corpus.skip_bad_lines)
    except BadLine as err:  # only raised without --skip-bad-lines: say that the flag exists
        raise BadLine(f"{err}; --skip-bad-lines skips (and counts) such lines") from None
    train_tokens, val_tokens = split_train_val(tokens, doc_ends, run.val_fraction, run.seq_len)
    batches = PackedBatches(PackedRows(train_tokens, run.seq_len), run.batch_size, seed)
    val_batches = fixed_batches(PackedRows(val_tokens, run.seq_len), flags, PackedRows.gather)
    return batches, val_batches, flags.optimizer_steps(batches.batches_per_epoch)


def describe(kind: str, model, batches: PackedBatches, val_batches: list, steps: int, device) -> str:
    rows = batches.rows
    return (
        f"{kind} pretraining: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{rows.num_rows:,} train rows x {rows.seq_len} tokens, "
        f"{sum(len(b) for b in val_batches)} val rows, {steps} steps of {batches.batch_size} rows on {device}"
    )
