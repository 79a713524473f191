"""DPO for both routes on the one training loop: the flags, the frozen reference model, the validation statistics
and the run. The pairs and their batches are scripts/common/data/pairs.py; the objective is
model/objectives/preference.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm import tqdm

from model.checkpoint import KIND_NAMES, Checkpoint, build_model
from model.errors import NanoLladaError
from model.objectives.preference import LOSS_TYPES, DPOObjective, PreferenceLoss
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

# The SFT defaults, with DPO's smaller batches of pairs, learning rate and warmup. 5e-7 is MiniMind's DPO learning
# rate for its dpo.jsonl (long answers, a 26M+ model); the report's tiny models take 5e-4 (technical_report.md 7.5).
DPO_DEFAULTS = {**SFT_DEFAULTS, "batch_size": 8, "learning_rate": 5e-7, "warmup_steps": 10, "eval_batches": 10}
# A run stops when the validation pairs' chosen answers have lost this many nats per token against the reference:
# their likelihood per token down to e^-0.5 = 0.61 of the start's, DPO's displacement and not a preference learnt.
MAX_CHOSEN_DROP = 0.5
TERMS = PreferenceLoss()  # the loss terms' defaults (model/objectives/preference.py)


@dataclass
class DPOData:
    """The DPO flags besides the training flags: the pairs, the SFT model, the temperature."""

    data: str = flag(None, 'preference jsonl: {"chosen": [turns], "rejected": [turns]} a line', required=True)
    eval_data: str | None = flag(None, "held-out pairs (default: hold out --val-fraction of --data)", kind=str)
    load_from: str = flag(None, "the SFT checkpoint: the starting policy and the frozen reference", required=True)
    # A finite beta > 0: infinity turns every margin into +-inf and the loss into NaN.
    beta: float = flag(0.1, "DPO temperature: reward = beta * (log pi - log pi_ref)", low=0, above_low=True)
    # What keeps the chosen answer up (PreferenceLoss): plain DPO pushes both answers down (technical_report.md 7.5).
    loss_type: str = flag(TERMS.loss_type, "sigmoid: DPO; ipo: IPO", choices=LOSS_TYPES)
    nll_weight: float = flag(
        TERMS.nll_weight, "RPO: weight of the chosen answer's NLL per token (0 = plain DPO)", low=0
    )
    chosen_floor: float = flag(
        TERMS.chosen_floor, "DPOP lambda: penalise the chosen answer falling below the reference (0 = off)", low=0
    )
    length_normalized: bool = flag(TERMS.length_normalized, "SimPO: each answer's log-ratio per token", kind=bool)
    reference_free: bool = flag(
        TERMS.reference_free,
        "SimPO: the reward is beta * log pi alone (the reference only measures the drift)",
        kind=bool,
    )
    target_margin: float = flag(TERMS.target_margin, "SimPO gamma: sigmoid(beta * z - gamma)")
    max_chosen_drop: float = flag(
        MAX_CHOSEN_DROP,
        "stop when the validation pairs' chosen answers lose more than this many nats per token against the "
        "reference (0 = never)",
        low=0,
    )

    def terms(self) -> PreferenceLoss:
        """The loss terms: the flags of the same names."""
        return PreferenceLoss(**{term.name: getattr(self, term.name) for term in fields(PreferenceLoss)})


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
    max_chosen_drop: float = MAX_CHOSEN_DROP  # nats per token; 0: never stop
    say: Callable[[str], None] = tqdm.write
    sums: dict = field(default_factory=dict)
    pairs: int = 0
    last: dict = field(default_factory=dict)

    def add(self, stats: dict, pairs: int) -> None:
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * pairs
        self.pairs += pairs

    def record(self, step: int, val_loss: float) -> None:
        """The loop's on_eval: one metrics line with the means, a printed summary, and the stop line (under
        torchrun rank 0 decides on its share of the batches, and its exit ends the group)."""
        self.last = {f"val_{name}": total / max(self.pairs, 1) for name, total in self.sums.items()}
        self.sums, self.pairs = {}, 0
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **self.last}) + "\n")
        self.say(
            f"step {step}: val DPO loss {val_loss:.4f}, preference accuracy {self.last['val_accuracy']:.3f}, "
            f"reward margin {self.last['val_reward_margin']:.4f}, chosen drift {self.last['val_chosen_drift']:.3f} nats"
        )
        drop = -self.last["val_chosen_drift_per_token"]
        if self.max_chosen_drop and drop > self.max_chosen_drop:
            raise NanoLladaError(
                f"stopped at step {step}: the validation pairs' chosen answers lost {drop:.3f} nats per token against "
                f"the reference (--max-chosen-drop {self.max_chosen_drop}); DPO is pushing the chosen answer down, not "
                "up: lower --learning-rate or raise --nll-weight"
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
    validation = ValidationStats(RunFiles(run.cfg).metrics, own.max_chosen_drop)

    def val_loss(model, batch, rng):
        loss, stats = objective(model, batch, rng)
        validation.add(stats, pairs_in(batch))
        return loss

    print(
        f"{KIND_NAMES[route].split()[1]} DPO: {policy.num_parameters() / 1e6:.2f}M parameters, "
        f"{len(run.batches.examples)} pairs, {sum(pairs_in(b) for b in run.val_batches)} validation, "
        f"{run.cfg.max_steps} steps of {flags.run.batch_size} on {run.device}, {objective.terms}, "
        f"reference {own.load_from}"
    )
    task = Task(run.batches.batch, run.val_batches, objective, val_loss, loss_count=pairs_in)
    dpo = {"data": own.data, "load_from": own.load_from, **asdict(objective.terms)}
    meta = {"dpo": dpo, **extra_meta(checkpoint)}
    options = RunOptions(tokenizer_identity(run.tokenizer), flags.run.resume, meta, on_eval=validation.record)
    summary = train(policy, run.cfg, task, options, run.device)
    return {**summary, "validation": validation.last}
