"""What both SFT entry points share: the SFT flags and defaults, the data split into train and validation batches,
and the run on the one training loop. The data itself (chat rendering, assistant spans, batches) is
scripts/common/data/sft.py."""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass

from model.checkpoint import KIND_NAMES
from model.cross_entropy import IGNORE_INDEX
from model.tokenizer import tokenizer_identity
from scripts.common.data.sft import SFTBatches, collate, load_sft_examples
from scripts.common.settings import add_flags, flag
from scripts.common.training.flags import (
    RunStart,
    TrainingFlags,
    add_training_flags,
    fixed_batches,
    start_run,
    starting_checkpoint,
    starting_model,
    train_and_val,
)
from scripts.common.training.run_files import RunFiles
from scripts.common.training.trainer import RunOptions, Task, train

# SFT defaults shared by both routes; each entry point adds its run name and epochs.
SFT_DEFAULTS = dict(
    batch_size=16,
    seq_len=512,
    val_fraction=0.02,
    learning_rate=5e-5,
    warmup_steps=50,
    lr_stable_ratio=0.8,
    eval_batches=20,
)


@dataclass
class SFTData:
    """The SFT data flags: the conversations, the held-out ones, the model they fine-tune."""

    data: str = flag(None, 'SFT jsonl: {"conversations": [{"role", "content"}, ...]} per line', required=True)
    eval_data: str | None = flag(None, "held-out SFT jsonl (default: hold out --val-fraction of --data)", kind=str)
    load_from: str | None = flag(
        None, "pretrained checkpoint to fine-tune (weights only; optimizer starts fresh)", kind=str
    )
    group_by_length: bool = flag(
        False, "batch conversations of similar length together (shuffled within runs of 16 batches): far less padding"
    )


def sft_parser(description: str, run_name: str, epochs: int) -> argparse.ArgumentParser:
    """An SFT entry point's parser: the SFT data flags and every training flag, with the SFT defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, SFTData)
    add_training_flags(p, run_name=run_name, epochs=epochs, **SFT_DEFAULTS)
    return p


def sft_data(
    flags: TrainingFlags, tokenizer, route: str, eos_padding: int | None = None
) -> tuple[SFTBatches, list, int]:
    """(training batches, fixed validation batches, optimizer steps); `eos_padding` as in collate."""
    run, own = flags.run, flags.own
    examples, val = train_and_val(flags, lambda path: load_sft_examples(path, tokenizer, run.seq_len), "conversations")
    batches = SFTBatches(examples, run.batch_size, flags.optimizer.seed, route, own.group_by_length, eos_padding)
    val_batches = fixed_batches(val, flags, lambda rows, indices: collate(rows, indices, route, eos_padding))
    return batches, val_batches, flags.optimizer_steps(batches.order.batches_per_epoch)


def start_sft(flags: TrainingFlags, eos_padding: int | None = None) -> RunStart:
    """Tokenizer, device and the tokenized conversations of an SFT run (its route: flags.optimizer.kind)."""
    return start_run(flags, functools.partial(sft_data, route=flags.optimizer.kind, eos_padding=eos_padding))


def scored_tokens(batch: dict) -> int:
    """What the AR SFT loss is a mean over: the assistant tokens (multi-process runs weight ranks by it)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def run_sft(flags: TrainingFlags, run: RunStart, loss_fn, extra_meta=None, start=None, config_changes=None) -> dict:
    """The model and the one loop; loss_fn scores training and validation batches alike, returning (loss, info
    logged per step). `start`: the (path, checkpoint) of sft_starting_checkpoint, if already read; `config_changes`:
    model config fields the run sets (how the trained model reads its input)."""
    route = run.cfg.kind
    source, checkpoint = start or sft_starting_checkpoint(flags, run)
    if checkpoint is None:
        print("note: no --load-from given; fine-tuning a randomly initialised model")
    model = starting_model(flags, run.tokenizer, source, checkpoint, config_changes)
    print(
        f"{KIND_NAMES[route].split()[1]} SFT: {model.num_parameters() / 1e6:.2f}M parameters, "
        f"{len(run.batches.examples)} conversations, {sum(len(b['input_ids']) for b in run.val_batches)} validation, "
        f"{run.cfg.max_steps} steps of {flags.run.batch_size} on {run.device}"
    )
    task = Task(run.batches.batch, run.val_batches, loss_fn, lambda *batch: loss_fn(*batch)[0])
    if route == "ar":
        task.loss_count = scored_tokens
    meta = {"sft": {"data": flags.own.data, "load_from": flags.own.load_from}, **(extra_meta or {})}
    options = RunOptions(tokenizer_identity(run.tokenizer), flags.run.resume, meta)
    return train(model, run.cfg, task, options, run.device)


def sft_starting_checkpoint(flags: TrainingFlags, run: RunStart) -> tuple:
    """(path, checkpoint) an SFT run starts from, read and checked once: the run's own (--resume), the pretrained
    --load-from, or (None, None) for a fresh model."""
    kind = run.cfg.kind
    source = RunFiles(run.cfg).full if flags.run.resume else flags.own.load_from
    hint = f"this SFT trains {KIND_NAMES[kind]} model"
    return source, starting_checkpoint(flags, run.tokenizer, source, kind, hint=hint)
