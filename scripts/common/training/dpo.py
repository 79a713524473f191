"""DPO for both routes on the one training loop: preference pairs read and tokenized, their batches, the frozen
reference model and the validation statistics. The objective itself is model/preference.py.

Data: MiniMind's dpo.jsonl, one pair a line, {"chosen": [{"role", "content"}, ...], "rejected": [...]}: two
conversations that agree on every turn before their last turn, an assistant answer. Only that answer is scored,
rendered as SFT renders it (scripts/common/training/sft.py). A bad row stops the run with its file:line: a preference
set with broken pairs is not one to optimise silently.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import KIND_NAMES, Checkpoint, build_model
from model.errors import NanoLladaError
from model.preference import DPOObjective
from model.tokenizer import PAD_ID, tokenizer_identity
from scripts.common.data.packing import EpochOrder
from scripts.common.data.readers import BadLine, conversation_of, iter_jsonl
from scripts.common.training.flags import add_training_flags, optimizer_steps, start_run, starting_checkpoint
from scripts.common.training.run_files import RunFiles
from scripts.common.training.sft import SFT_DEFAULTS, encode_conversations
from scripts.common.training.trainer import RunOptions, Task, train

# The SFT defaults, with DPO's smaller batches of pairs, learning rate and warmup.
DPO_DEFAULTS = {**SFT_DEFAULTS, "batch_size": 8, "learning_rate": 5e-7, "warmup_steps": 10, "eval_batches": 10}
SIDES = ("chosen", "rejected")


def read_pair(path, lineno: int, obj: dict) -> tuple[list[dict], list[dict]]:
    """The (chosen, rejected) conversations of one row, checked: both present and valid, both ending in an answer,
    the same prompt."""
    sides = []
    for side in SIDES:
        if side not in obj:
            raise BadLine(
                f"{path}:{lineno}: no field '{side}' (this line has: {', '.join(sorted(obj)) or 'nothing'}); "
                "a preference pair needs 'chosen' and 'rejected' conversations"
            )
        try:
            turns = conversation_of(path, lineno, {"conversations": obj[side]})
        except BadLine as err:
            raise BadLine(f"{err} (in '{side}')") from None
        if turns[-1]["role"] != "assistant":
            raise BadLine(f"{path}:{lineno}: '{side}' must end with the assistant answer it is judged by")
        sides.append(turns)
    if sides[0][:-1] != sides[1][:-1]:
        raise BadLine(
            f"{path}:{lineno}: 'chosen' and 'rejected' have different prompts (every turn before the last answer "
            "must be the same); fix the line"
        )
    return sides[0], sides[1]


def answer_start(mask: list[int]) -> int:
    """Where the last assistant span of an SFT mask starts (the mask ends with it)."""
    start = len(mask)
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


@dataclass
class PairExamples:
    """Tokenized pairs: pair i is sides[i] = ((chosen ids, answer start), (rejected ids, answer start))."""

    sides: list

    def __len__(self) -> int:
        return len(self.sides)

    def subset(self, indices) -> PairExamples:
        return PairExamples([self.sides[i] for i in indices])


def load_pairs(path, tokenizer, max_len: int) -> PairExamples:
    """Every pair of a file, tokenized and truncated to max_len tokens; a pair whose prompt fills max_len is
    skipped (counted in a summary line)."""
    pairs = [read_pair(path, lineno, obj) for lineno, obj in iter_jsonl(path)]
    if not pairs:
        raise NanoLladaError(f"{path}: no preference pairs in the file")
    encoded = encode_conversations(tokenizer, [c for c, _ in pairs] + [r for _, r in pairs])
    sides, cut = [], 0
    for chosen, rejected in zip(encoded[: len(pairs)], encoded[len(pairs) :]):
        pair = tuple(
            (np.asarray(ids[:max_len], dtype=np.int64), answer_start(mask)) for ids, mask in (chosen, rejected)
        )
        if any(start >= max_len for _, start in pair):
            cut += 1
            continue
        sides.append(pair)
    if not sides:
        raise NanoLladaError(f"{path}: every prompt fills --max-seq-len {max_len}; raise it or shorten the prompts")
    print(f"{path}: {len(sides)} preference pairs, {cut} skipped (no answer token within --max-seq-len {max_len})")
    return PairExamples(sides)


def collate_pairs(examples: PairExamples, indices) -> dict:
    """The pair batch of model/preference.py: input_ids, answer [B, 2, T] (PAD on the right), length [B, 2]."""
    chosen_rejected = [examples.sides[int(i)] for i in indices]
    width = max(len(ids) for pair in chosen_rejected for ids, _ in pair)
    input_ids = torch.full((len(chosen_rejected), 2, width), PAD_ID, dtype=torch.long)
    answer = torch.zeros(input_ids.shape, dtype=torch.bool)
    length = torch.zeros(input_ids.shape[:2], dtype=torch.long)
    for row, pair in enumerate(chosen_rejected):
        for side, (ids, start) in enumerate(pair):
            input_ids[row, side, : len(ids)] = torch.from_numpy(ids)
            answer[row, side, start : len(ids)] = True
            length[row, side] = len(ids)
    return {"input_ids": input_ids, "answer": answer, "length": length}


class PairBatches:
    def __init__(self, examples: PairExamples, batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise NanoLladaError(f"only {len(examples)} training pairs, fewer than --batch-size {batch_size}")
        self.examples = examples
        self.order = EpochOrder(len(examples), batch_size, seed)

    def batch(self, k: int) -> dict:
        return collate_pairs(self.examples, self.order.indices(k))


def dpo_parser(description: str, run_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help='preference jsonl: {"chosen": [turns], "rejected": [turns]} a line')
    p.add_argument("--eval-data", default=None, help="held-out pairs (default: hold out --val-fraction of --data)")
    p.add_argument(
        "--load-from", required=True, help="the SFT checkpoint: the starting policy and the frozen reference"
    )
    p.add_argument("--beta", type=float, default=0.1, help="DPO temperature: reward = beta * (log pi - log pi_ref)")
    add_training_flags(p, run_name=run_name, epochs=1, **DPO_DEFAULTS)
    return p


def dpo_data(args, tokenizer) -> tuple[PairBatches, list, int]:
    """(training batches, fixed validation batches, optimizer steps)."""
    examples = load_pairs(args.data, tokenizer, args.seq_len)
    if args.eval_data:
        val = load_pairs(args.eval_data, tokenizer, args.seq_len)
    else:  # the last pairs of the file, a stable split
        n_val = max(1, int(len(examples) * args.val_fraction))
        if len(examples) - n_val < args.batch_size:
            raise NanoLladaError(f"{args.data}: {len(examples)} pairs are too few to hold out {n_val} and fill a batch")
        val, examples = (
            examples.subset(range(len(examples) - n_val, len(examples))),
            examples.subset(range(len(examples) - n_val)),
        )
    batches = PairBatches(examples, args.batch_size, args.seed)
    n_val = min(len(val), args.eval_batches * args.batch_size)
    val_batches = [
        collate_pairs(val, range(i, min(i + args.batch_size, n_val))) for i in range(0, n_val, args.batch_size)
    ]
    return batches, val_batches, optimizer_steps(args, batches.order.batches_per_epoch)


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


def run_dpo(args, route: str, make_objective: MakeObjective, extra_meta: Callable[[Checkpoint], dict]) -> dict:
    """The run both DPO entry points share; the summary of the loop plus the last validation statistics."""
    if not args.beta > 0:
        raise NanoLladaError(f"--beta must be positive, got {args.beta}")
    run = start_run(args, route, dpo_data)
    hint = f"this DPO trains {KIND_NAMES[route]} model"
    checkpoint = starting_checkpoint(args, run.tokenizer, args.load_from, route, hint=hint)
    policy = build_model(checkpoint, args.load_from)  # on --resume the loop loads the run's own weights over it
    reference = build_model(checkpoint, args.load_from).to(run.device).eval().requires_grad_(False)
    objective = make_objective(reference, checkpoint, run.tokenizer)
    validation = ValidationStats(RunFiles(run.cfg).metrics)

    def val_loss(model, batch, rng):
        loss, stats = objective(model, batch, rng)
        validation.add(stats, pairs_in(batch))
        return loss

    print(
        f"{KIND_NAMES[route].split()[1]} DPO: {policy.num_parameters() / 1e6:.2f}M parameters, "
        f"{len(run.batches.examples)} pairs, {sum(pairs_in(b) for b in run.val_batches)} validation, "
        f"{run.cfg.max_steps} steps of {args.batch_size} on {run.device}, beta {args.beta}, reference {args.load_from}"
    )
    task = Task(run.batches.batch, run.val_batches, objective, val_loss, loss_count=pairs_in)
    meta = {"dpo": {"data": args.data, "load_from": args.load_from, "beta": args.beta}, **extra_meta(checkpoint)}
    options = RunOptions(tokenizer_identity(run.tokenizer), args.resume, meta, on_eval=validation.record)
    summary = train(policy, run.cfg, task, options, run.device)
    return {**summary, "validation": validation.last}
