"""DPO for both routes on the one training loop: the flags, the frozen reference model, the validation statistics
and the run. The pairs and their batches are scripts/common/data/pairs.py; the objective is
model/objectives/preference.py."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from model.checkpoint import KIND_NAMES, Checkpoint, build_model
from model.errors import NanoLladaError
from model.objectives.preference import LOSS_TYPES, DPOObjective, PreferenceLoss
from model.tokenizer import tokenizer_identity
from scripts.common.cli import Bounded
from scripts.common.data.pairs import PairBatches, collate_pairs, load_pairs
from scripts.common.training.flags import (
    add_training_flags,
    fixed_batches,
    optimizer_steps,
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


def dpo_parser(description: str, run_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help='preference jsonl: {"chosen": [turns], "rejected": [turns]} a line')
    p.add_argument("--eval-data", default=None, help="held-out pairs (default: hold out --val-fraction of --data)")
    p.add_argument(
        "--load-from", required=True, help="the SFT checkpoint: the starting policy and the frozen reference"
    )
    # A finite beta > 0: infinity turns every margin into +-inf and the loss into NaN.
    p.add_argument(
        "--beta",
        type=float,
        action=Bounded,
        low=0,
        above_low=True,
        default=0.1,
        help="DPO temperature: reward = beta * (log pi - log pi_ref)",
    )
    add_preference_flags(p)
    add_training_flags(p, run_name=run_name, epochs=1, **DPO_DEFAULTS)
    return p


def add_preference_flags(p: argparse.ArgumentParser) -> None:
    """The terms of PreferenceLoss (model/objectives/preference.py) beyond --beta, and the stop line."""
    terms, g = PreferenceLoss(), p.add_argument_group("preference loss (keeping the chosen answer up)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default=terms.loss_type, help="sigmoid: DPO; ipo: IPO")
    g.add_argument(
        "--nll-weight",
        type=float,
        action=Bounded,
        low=0,
        default=terms.nll_weight,
        help="RPO: weight of the chosen answer's NLL per token (0 = plain DPO)",
    )
    g.add_argument(
        "--chosen-floor",
        type=float,
        action=Bounded,
        low=0,
        default=terms.chosen_floor,
        help="DPOP lambda: penalise the chosen answer's log-likelihood falling below the reference's (0 = off)",
    )
    g.add_argument(
        "--length-normalized",
        action=argparse.BooleanOptionalAction,
        default=terms.length_normalized,
        help="SimPO: each answer's log-ratio per token",
    )
    g.add_argument(
        "--reference-free",
        action=argparse.BooleanOptionalAction,
        default=terms.reference_free,
        help="SimPO: the reward is beta * log pi alone (the reference only measures the drift)",
    )
    g.add_argument(
        "--target-margin", type=float, default=terms.target_margin, help="SimPO gamma: sigmoid(beta * z - gamma)"
    )
    g.add_argument(
        "--max-chosen-drop",
        type=float,
        action=Bounded,
        low=0,
        default=MAX_CHOSEN_DROP,
        help="stop when the validation pairs' chosen answers lose more than this many nats per token against "
        "the reference (0 = never)",
    )


def preference_terms(args) -> PreferenceLoss:
    return PreferenceLoss(
        args.beta,
        args.loss_type,
        args.nll_weight,
        args.chosen_floor,
        args.length_normalized,
        args.reference_free,
        args.target_margin,
    )


def dpo_data(args, tokenizer) -> tuple[PairBatches, list, int]:
    """(training batches, fixed validation batches, optimizer steps)."""
    examples, val = train_and_val(args, lambda path: load_pairs(path, tokenizer, args.seq_len), "pairs")
    batches = PairBatches(examples, args.batch_size, args.seed)
    val_batches = fixed_batches(val, args, collate_pairs)
    return batches, val_batches, optimizer_steps(args, batches.order.batches_per_epoch)


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
        """The loop's on_eval: one metrics line with the means, a printed summary, and the stop line."""
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


def run_dpo(args, route: str, make_objective: MakeObjective, extra_meta: Callable[[Checkpoint], dict]) -> dict:
    """The run both DPO entry points share; the summary of the loop plus the last validation statistics."""
    run = start_run(args, route, dpo_data)
    hint = f"this DPO trains {KIND_NAMES[route]} model"
    own = RunFiles(run.cfg).full  # what --resume continues; --load-from only gives the shape and the reference
    checkpoint = starting_checkpoint(args, run.tokenizer, args.load_from, route, hint=hint, run_path=own)
    policy = build_model(checkpoint, args.load_from)  # on --resume the loop loads the run's own weights over it
    reference = build_model(checkpoint, args.load_from).to(run.device).eval().requires_grad_(False)
    objective = make_objective(reference, checkpoint, run.tokenizer)
    validation = ValidationStats(RunFiles(run.cfg).metrics, args.max_chosen_drop)

    def val_loss(model, batch, rng):
        loss, stats = objective(model, batch, rng)
        validation.add(stats, pairs_in(batch))
        return loss

    print(
        f"{KIND_NAMES[route].split()[1]} DPO: {policy.num_parameters() / 1e6:.2f}M parameters, "
        f"{len(run.batches.examples)} pairs, {sum(pairs_in(b) for b in run.val_batches)} validation, "
        f"{run.cfg.max_steps} steps of {args.batch_size} on {run.device}, {objective.terms}, reference {args.load_from}"
    )
    task = Task(run.batches.batch, run.val_batches, objective, val_loss, loss_count=pairs_in)
    dpo = {"data": args.data, "load_from": args.load_from, **asdict(objective.terms)}
    meta = {"dpo": dpo, **extra_meta(checkpoint)}
    options = RunOptions(tokenizer_identity(run.tokenizer), args.resume, meta, on_eval=validation.record)
    summary = train(policy, run.cfg, task, options, run.device)
    return {**summary, "validation": validation.last}
