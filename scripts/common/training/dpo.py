"""DPO for both routes on the one training loop: the flags, the frozen reference model, the validation statistics
and the run. The pairs and their batches are scripts/common/data/pairs.py; the objective is
model/objectives/preference.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from model.checkpoint import KIND_NAMES, Checkpoint, build_model
from model.objectives.preference import DPOObjective
from model.tokenizer import tokenizer_identity
from scripts.common.data.pairs import PairBatches, collate_pairs, load_pairs
from scripts.common.settings import add_flags, flag, settings_from
from scripts.common.training.flags import (
    TrainingFlags,
    add_training_flags,
    fixed_batches,
    start_run,
    starting_checkpoint,
    train_and_val,
)
from scripts.common.training.run_files import RunFiles
from scripts.common.training.sft import SFT_DEFAULTS
from scripts.common.training.trainer import RunOptions, Task, train

# The SFT defaults, with DPO's smaller batches of pairs, learning rate and warmup.
DPO_DEFAULTS = {**SFT_DEFAULTS, "batch_size": 8, "learning_rate": 5e-7, "warmup_steps": 10, "eval_batches": 10}


@dataclass
class DPOData:
    """The DPO flags besides the training flags: the pairs, the SFT model, the temperature."""

    data: str = flag(None, 'preference jsonl: {"chosen": [turns], "rejected": [turns]} a line', required=True)
    eval_data: str | None = flag(None, "held-out pairs (default: hold out --val-fraction of --data)", kind=str)
    load_from: str = flag(None, "the SFT checkpoint: the starting policy and the frozen reference", required=True)
    # A finite beta > 0: infinity turns every margin into +-inf and the loss into NaN.
    beta: float = flag(0.1, "DPO temperature: reward = beta * (log pi - log pi_ref)", low=0, above_low=True)


def dpo_parser(description: str, run_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, DPOData)
    add_training_flags(p, run_name=run_name, epochs=1, **DPO_DEFAULTS)
    return p


def dpo_settings(args: argparse.Namespace, route: str) -> TrainingFlags:
    """A DPO command line, typed."""
    return TrainingFlags.from_args(args, route, settings_from(DPOData, args))


def dpo_data(flags: TrainingFlags, tokenizer) -> tuple[PairBatches, list, int]:
    """(training batches, fixed validation batches, optimizer steps)."""
    run = flags.run
    examples, val = train_and_val(flags, lambda path: load_pairs(path, tokenizer, run.seq_len), "pairs")
    batches = PairBatches(examples, run.batch_size, flags.optimizer.seed)
    val_batches = fixed_batches(val, flags, collate_pairs)
    return batches, val_batches, flags.optimizer_steps(batches.order.batches_per_epoch)


def pairs_in(batch: dict) -> int:
    """What the DPO loss is a mean over: pairs (multi-process runs weight ranks by them)."""
    return int(batch["input_ids"].shape[0])


@dataclass
class ValidationStats:
    """DPO statistics of the validation batches, pair-weighted, gathered while the loop scores them. Under
    torchrun they are rank 0's share of the batches (the loop all-reduces only the loss)."""

    path: object
    say: Callable[[str], None] = tqdm.write
    sums: dict = field(default_factory=dict)
    pairs: int = 0
    last: dict = field(default_factory=dict)

    def add(self, stats: dict, pairs: int) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * pairs
        self.pairs += pairs

    def record(self, step: int, val_loss: float) -> None:
        """The loop's on_eval: one metrics line with the means, and a printed summary."""
        self.last = {f"val_{name}": total / max(self.pairs, 1) for name, total in self.sums.items()}
        self.sums, self.pairs = {}, 0
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **self.last}) + "\n")
        self.say(
            f"step {step}: val DPO loss {val_loss:.4f}, preference accuracy {self.last['val_accuracy']:.3f}, "
            f"reward margin {self.last['val_reward_margin']:.4f}"
        )


# make_objective(reference, starting checkpoint, tokenizer) -> the route's DPOObjective
MakeObjective = Callable[[torch.nn.Module, Checkpoint, object], DPOObjective]


def run_dpo(flags: TrainingFlags, make_objective: MakeObjective, extra_meta: Callable[[Checkpoint], dict]) -> dict:
    """The run both DPO entry points share; the summary of the loop plus the last validation statistics."""
    route, own = flags.optimizer.kind, flags.own
    run = start_run(flags, dpo_data)
    hint = f"this DPO trains {KIND_NAMES[route]} model"
    run_file = RunFiles(run.cfg).full  # what --resume continues; --load-from only gives the shape and the reference
    checkpoint = starting_checkpoint(flags, run.tokenizer, own.load_from, route, hint=hint, run_path=run_file)
    policy = build_model(checkpoint, own.load_from)  # on --resume the loop loads the run's own weights over it
    reference = build_model(checkpoint, own.load_from).to(run.device).eval().requires_grad_(False)
    objective = make_objective(reference, checkpoint, run.tokenizer)
    validation = ValidationStats(RunFiles(run.cfg).metrics)

    def val_loss(model, batch, rng):
        loss, stats = objective(model, batch, rng)
        validation.add(stats, pairs_in(batch))
        return loss

    print(
        f"{KIND_NAMES[route].split()[1]} DPO: {policy.num_parameters() / 1e6:.2f}M parameters, "
        f"{len(run.batches.examples)} pairs, {sum(pairs_in(b) for b in run.val_batches)} validation, "
        f"{run.cfg.max_steps} steps of {flags.run.batch_size} on {run.device}, beta {own.beta}, "
        f"reference {own.load_from}"
    )
    task = Task(run.batches.batch, run.val_batches, objective, val_loss, loss_count=pairs_in)
    meta = {"dpo": {"data": own.data, "load_from": own.load_from, "beta": own.beta}, **extra_meta(checkpoint)}
    options = RunOptions(tokenizer_identity(run.tokenizer), flags.run.resume, meta, on_eval=validation.record)
    summary = train(policy, run.cfg, task, options, run.device)
    return {**summary, "validation": validation.last}
