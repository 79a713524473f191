"""The command line and the start every trainer shares: the training flags (each defined once, with the same
spelling and aliases everywhere), the TrainConfig they make, and the steps before the loop (tokenizer, device,
data, the checkpoint a run starts from).

A trainer passes its own defaults (run name, batch size, learning rate...); every other default is TrainConfig's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from model.checkpoint import Checkpoint, check_compatible, read_checkpoint
from model.errors import NanoLladaError
from model.tokenizer import load_tokenizer
from scripts.common.cli import (
    Bounded,
    add_model_flags,
    interrupted_before_training,
    pick_device,
    positive,
    refuse_changed_model_flags,
    writable_dir,
)
from scripts.common.training.distributed import main_process_first
from scripts.common.training.optimization import TrainConfig

CONFIG_FIELDS = {f.name: f.default for f in fields(TrainConfig)}


def add_training_flags(
    p: argparse.ArgumentParser,
    run_name: str,
    batch_size: int,
    epochs: float,
    seq_len: int,
    val_fraction: float,
    **config_defaults,
) -> None:
    """The flags of every trainer. `config_defaults` are this trainer's defaults for TrainConfig fields (by field
    name; compile=None means on with CUDA); the other fields keep TrainConfig's."""
    unknown = set(config_defaults) - set(CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"not TrainConfig fields: {sorted(unknown)}")
    default = {**CONFIG_FIELDS, **config_defaults}
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--run-name", default=run_name)
    p.add_argument("--save-dir", default="weights")
    p.add_argument("--resume", action="store_true", help="continue <save-dir>/<run-name>.pt where it stopped")
    add_model_flags(p)
    p.add_argument(
        "--seq-len",
        "--max-seq-len",
        dest="seq_len",
        type=int,
        action=Bounded,
        low=2,  # one token has no next token to predict: the loss would be a mean over nothing (NaN)
        default=seq_len,
        help="tokens per training row (pretraining packs rows of this length; SFT truncates longer conversations)",
    )
    p.add_argument(
        "--epochs", type=float, default=epochs, help="passes over the training split (unless --max-iters is given)"
    )
    p.add_argument(
        "--max-iters", "--max-steps", dest="max_steps", type=int, default=None, help="optimizer steps (default: epochs)"
    )
    p.add_argument("--batch-size", type=int, action=Bounded, low=1, default=batch_size)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=val_fraction,
        help="share held out for validation from the end of the data (pretraining: tokens; SFT: conversations)",
    )
    _add_config_flags(p, default)
    p.add_argument("--device", default=None)


def _add_config_flags(p: argparse.ArgumentParser, default: dict) -> None:
    """The flags that are TrainConfig fields of the same name."""
    lowest = {"accumulation_steps": 1, "warmup_steps": 0, "eval_interval": 1, "eval_batches": 1, "save_interval": 1}
    for name, low in lowest.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, action=Bounded, low=low, default=default[name])
    p.add_argument("--learning-rate", "--lr", type=float, default=default["learning_rate"])
    p.add_argument("--lr-schedule", choices=["cosine", "wsd", "constant"], default=default["lr_schedule"])
    p.add_argument(
        "--lr-stable-ratio",
        type=float,
        default=default["lr_stable_ratio"],
        help="wsd: fraction of steps held at the peak LR after warmup",
    )
    for name in ("min_lr_ratio", "weight_decay", "grad_clip"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=default[name])
    p.add_argument("--log-interval", type=int, action=Bounded, low=1, default=default["log_interval"])
    p.add_argument(
        "--early-stop-patience",
        type=int,
        action=Bounded,
        low=0,
        default=default["early_stop_patience"],
        help="evals without improvement before stopping (0 = off)",
    )
    p.add_argument("--early-stop-min-delta", type=float, default=default["early_stop_min_delta"])
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=default["dtype"],
        help="autocast dtype on CUDA (CPU runs float32)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=default["compile"],
        help="torch.compile on CUDA (default: on for pretraining; off for SFT, whose batches vary in length)",
    )
    p.add_argument("--seed", type=int, default=default["seed"])


def check_training_flags(args) -> None:
    """The checks that are not one flag's range (those are checked as the flags are parsed: Bounded)."""
    positive("--epochs", args.epochs)
    if args.max_steps is not None:
        positive("--max-iters", args.max_steps)
    if not 0 < args.val_fraction < 0.5:
        raise NanoLladaError(f"--val-fraction must lie in (0, 0.5), got {args.val_fraction}")


def optimizer_steps(args, batches_per_epoch: int) -> int:
    """--max-iters, or the optimizer steps of --epochs passes."""
    if args.max_steps is not None:
        return args.max_steps
    return int(args.epochs * batches_per_epoch) // args.accumulation_steps


def train_config(args, kind: str, steps: int, device: torch.device) -> TrainConfig:
    """The TrainConfig of the parsed flags: every field with a flag of its name, plus what the run decided."""
    flags = {name: getattr(args, name) for name in CONFIG_FIELDS if hasattr(args, name)}
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    return TrainConfig(
        **{**flags, "kind": kind, "max_steps": steps, "out_dir": args.save_dir, "compile": compile_model}
    )


@dataclass
class RunStart:
    tokenizer: object
    device: torch.device
    batches: object  # .batch(k) is the global micro-batch k
    val_batches: list
    cfg: TrainConfig


def start_run(args, kind: str, load_data: Callable) -> RunStart:
    """Checked flags, tokenizer, device, seeded torch RNG, data and TrainConfig: the steps before any model.
    load_data(args, tokenizer) -> (training batches, validation batches, optimizer steps)."""
    check_training_flags(args)
    writable_dir(args.save_dir, "--save-dir")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    try:
        with main_process_first():  # under torchrun, rank 0 writes the tokenized cache the others read
            batches, val_batches, steps = load_data(args, tokenizer)
    except KeyboardInterrupt:
        raise interrupted_before_training(args.resume) from None
    return RunStart(tokenizer, device, batches, val_batches, train_config(args, kind, steps, device))


def starting_checkpoint(args, tokenizer, path, kind: str, hint: str | None = None, run_path=None) -> Checkpoint | None:
    """The checkpoint at `path` (None: none, start fresh), refused unless it is `kind` with this tokenizer (and,
    on --resume, unless every shape flag and structural setting given agrees with it). `run_path`: the run's own
    checkpoint when `path` is another (DPO starts from --load-from), named by the resume errors."""
    if path is None:
        return None
    if args.resume and run_path is None:  # the run's own file is of another kind: the name is taken, not mistyped
        hint = "--resume continues the run of that name, which another trainer wrote; choose another --run-name"
    checkpoint = check_compatible(read_checkpoint(path), path, kind, tokenizer, args.tokenizer_dir, hint=hint)
    if args.resume:
        refuse_changed_model_flags(args, checkpoint.config, run_path or path)
        refuse_changed_settings(run_path or path, structural_settings(args, checkpoint.extra))
    return checkpoint


def structural_settings(args, extra: dict) -> dict[str, tuple]:
    """flag -> (the value this command trains with, the run's stored one) for the settings besides the model shape
    that decide what a run trains: diffusion pretraining's --block-size, diffusion SFT's --block-size (when given;
    without it the run inherits its own) and --eos-padding-length. None means off (bidirectional, no fixed padding)."""
    settings = {}
    if "sft_objective" in extra:
        if getattr(args, "block_size", None) is not None:
            settings["--block-size"] = (args.block_size or None, extra["sft_objective"].get("block_size"))
        if hasattr(args, "eos_padding_length") and "sft_eos_padding_length" in extra:
            settings["--eos-padding-length"] = (args.eos_padding_length, extra["sft_eos_padding_length"])
    elif "block_size" in extra.get("diffusion", {}) and hasattr(args, "block_size"):
        settings["--block-size"] = (args.block_size or None, extra["diffusion"]["block_size"] or None)
    return settings


def refuse_changed_settings(path, settings: dict[str, tuple]) -> None:
    """The resume rule for structural settings: a resumed run trains on as it started, so a value other than its
    checkpoint's is refused (applied, it would silently turn the rest of the run into another objective)."""
    changed = [
        f"{flag} {'(not given)' if asked is None else asked} (checkpoint: {'none' if stored is None else stored})"
        for flag, (asked, stored) in settings.items()
        if asked != stored
    ]
    if changed:
        raise NanoLladaError(
            f"--resume: {path} was trained with other settings, so {'; '.join(changed)} cannot apply; "
            "pass the checkpoint's values to resume it, or start a new --run-name"
        )


def train_and_val(args, load: Callable, what: str):
    """(training examples, validation examples) of an SFT or DPO run: --eval-data's, or the last --val-fraction of
    --data (the file order is the user's, so the split is stable). `load(path)` reads a file; `what` names its rows."""
    examples = load(args.data)
    if args.eval_data:
        return examples, load(args.eval_data)
    n_val = max(1, int(len(examples) * args.val_fraction))
    if len(examples) - n_val < args.batch_size:
        raise NanoLladaError(
            f"{args.data}: {len(examples)} {what} are too few to hold out {n_val} and fill a batch of {args.batch_size}"
        )
    return examples.subset(range(len(examples) - n_val)), examples.subset(range(len(examples) - n_val, len(examples)))


def fixed_batches(examples, args, collate: Callable) -> list:
    """The first --eval-batches batches of `examples`, the same at every evaluation."""
    n = min(len(examples), args.eval_batches * args.batch_size)
    return [collate(examples, range(i, min(i + args.batch_size, n))) for i in range(0, n, args.batch_size)]
