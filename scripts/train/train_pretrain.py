"""AR pretraining (MiniMind-style causal LM) on packed rows of a jsonl/txt corpus.

uv run python -m scripts.train.train_pretrain --data ./dataset/pretrain_hq.jsonl --jsonl-field text \
    --tokenizer-dir . --run-name minimind_pretrain --max-seq-len 256 --epochs 1 --batch-size 96
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from model.objectives.ar_loss import next_token_loss
from model.tokenizer import tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import parse, run_main
from scripts.common.settings import add_flags, flag, settings_from
from scripts.common.training.flags import TrainingFlags, start_run, starting_checkpoint, starting_model
from scripts.common.training.pretraining import Corpus, add_pretraining_flags, describe, packed_data
from scripts.common.training.run_files import RunFiles
from scripts.common.training.trainer import RunOptions, Task, train


@dataclass
class Start:
    """What AR pretraining starts from, besides the corpus."""

    load_from: str | None = flag(
        None, "initialise from an AR checkpoint or an official MiniMind2 .pth (its config wins)", kind=str
    )
    corpus: Corpus = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Batch 128 x 256 tokens: at 32 an H100 step (~6 ms) is about as long as launching it, so the GPU would idle.
    add_pretraining_flags(p, run_name="minimind_pretrain", batch_size=128, learning_rate=5e-4, warmup_steps=200)
    add_flags(p, Start)
    return parse(p, argv)


def settings(argv=None) -> TrainingFlags:
    """The command line, typed."""
    args = parse_args(argv)
    return TrainingFlags.from_args(args, "ar", settings_from(Start, args, corpus=settings_from(Corpus, args)))


def initial_model(flags: TrainingFlags, tokenizer, files: RunFiles) -> Transformer:
    """The model to train: from the run's own checkpoint (--resume), from --load-from, or fresh from the flags."""
    source = files.full if flags.run.resume else flags.own.load_from
    hint = "AR pretraining continues only AR checkpoints"
    return starting_model(flags, tokenizer, source, starting_checkpoint(flags, tokenizer, source, "ar", hint=hint))


def ar_loss(model, rows, rng, step=None):
    """Next-token cross-entropy; the same for training and validation (no randomness, no schedule)."""
    return next_token_loss(model, rows)


def main(argv=None) -> dict:
    flags = settings(argv)
    run = start_run(flags, packed_data)
    model = initial_model(flags, run.tokenizer, RunFiles(run.cfg))
    print(describe("AR", model, run.batches, run.val_batches, run.cfg.max_steps, run.device))
    task = Task(run.batches.batch, run.val_batches, ar_loss, ar_loss)
    return train(model, run.cfg, task, RunOptions(tokenizer_identity(run.tokenizer), flags.run.resume), run.device)


if __name__ == "__main__":
    run_main(main)
