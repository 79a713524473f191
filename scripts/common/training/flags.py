"""The command line and the start every trainer shares: the training flags (each defined once, with the same
spelling and aliases everywhere), the TrainConfig they make, and the steps before the loop (tokenizer, device,
data, the checkpoint a run starts from).

A trainer passes its own defaults (run name, batch size, learning rate...); every other default is TrainConfig's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from model.checkpoint import Checkpoint, build_model, check_compatible, read_checkpoint
from model.errors import NanoLladaError
from model.tokenizer import load_tokenizer
from model.transformer import Transformer
from scripts.common.cli import (
    ModelFlags,
    add_model_flags,
    interrupted_before_training,
    pick_device,
    positive,
    writable_dir,
)
from scripts.common.settings import add_flags, flag, flag_fields, settings_from
from scripts.common.training.distributed import main_process_first
from scripts.common.training.optimization import TrainConfig


@dataclass
class RunSettings:
    """What every trainer reads from its command line besides the optimizer's settings (TrainConfig) and the model
    shape: where the run lives, its rows, its length. Each trainer gives its own defaults (run name, batch size...)."""

    run_name: str = flag("run", "the run's files: <save-dir>/<run-name>.pt, its metrics and its loss plot")
    tokenizer_dir: str = flag(".", "folder of tokenizer.json")
    save_dir: str = flag("weights", "folder of checkpoints, metrics and plots")
    resume: bool = flag(False, "continue <save-dir>/<run-name>.pt where it stopped")
    # one token has no next token to predict: the loss would be a mean over nothing (NaN)
    seq_len: int = flag(
        256,
        "tokens per training row (pretraining packs rows of this length; SFT truncates longer conversations)",
        "--max-seq-len",
        low=2,
    )
    epochs: float = flag(1.0, "passes over the training split (unless --max-iters is given)")
    max_steps: int | None = flag(None, "optimizer steps (default: epochs)", "--max-iters", low=1, kind=int)
    batch_size: int = flag(16, "rows per micro-batch", low=1)
    val_fraction: float = flag(
        0.005, "share held out for validation from the end of the data (pretraining: tokens; SFT: conversations)"
    )
    device: str | None = flag(None, "cpu, cuda, cuda:N or mps (default: the best this machine has)", kind=str)


def add_training_flags(p: argparse.ArgumentParser, **defaults) -> None:
    """The flags of every trainer: RunSettings, the model shape and TrainConfig. `defaults` are this trainer's own,
    by field name (compile=None means on with CUDA); the other fields keep their classes' defaults."""
    run_fields = {f.name for f in flag_fields(RunSettings)}
    add_flags(p, RunSettings, **{k: v for k, v in defaults.items() if k in run_fields})
    add_model_flags(p)
    add_flags(p, TrainConfig, **{k: v for k, v in defaults.items() if k not in run_fields})


@dataclass
class TrainingFlags:
    """A trainer's command line, typed once at its door: where the run lives (RunSettings), the model shape flags,
    the optimizer (TrainConfig, whose max_steps the data decides) and the trainer's own settings (`own`: its data,
    its objective). Nothing below the entry point reads the argparse Namespace."""

    run: RunSettings
    shape: ModelFlags
    optimizer: TrainConfig
    own: object = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, kind: str, own=None) -> TrainingFlags:
        run = settings_from(RunSettings, args)
        optimizer = settings_from(TrainConfig, args, kind=kind, max_steps=0, out_dir=run.save_dir)
        flags = cls(run, ModelFlags.from_args(args), optimizer, own)
        flags.check()
        return flags

    def check(self) -> None:
        """The checks that are not one flag's range (those are checked as the flags are parsed: Bounded)."""
        positive("--epochs", self.run.epochs)
        if not 0 < self.run.val_fraction < 0.5:
            raise NanoLladaError(f"--val-fraction must lie in (0, 0.5), got {self.run.val_fraction}")

    def optimizer_steps(self, batches_per_epoch: int) -> int:
        """--max-iters, or the optimizer steps of --epochs passes."""
        if self.run.max_steps is not None:
            return self.run.max_steps
        return int(self.run.epochs * batches_per_epoch) // self.optimizer.accumulation_steps


@dataclass
class RunStart:
    tokenizer: object
    device: torch.device
    batches: object  # .batch(k) is the global micro-batch k
    val_batches: list
    cfg: TrainConfig


def start_run(flags: TrainingFlags, load_data: Callable) -> RunStart:
    """Tokenizer, device, seeded torch RNG, data and the run's TrainConfig: the steps before any model.
    load_data(flags, tokenizer) -> (training batches, validation batches, optimizer steps)."""
    run = flags.run
    writable_dir(run.save_dir, "--save-dir")
    tokenizer = load_tokenizer(run.tokenizer_dir)
    device = pick_device(run.device)
    torch.manual_seed(flags.optimizer.seed)
    try:
        with main_process_first():  # under torchrun, rank 0 writes the tokenized cache the others read
            batches, val_batches, steps = load_data(flags, tokenizer)
    except KeyboardInterrupt:
        raise interrupted_before_training(run.resume) from None
    compile_model = device.type == "cuda" if flags.optimizer.compile is None else flags.optimizer.compile
    cfg = replace(flags.optimizer, max_steps=steps, compile=compile_model)
    return RunStart(tokenizer, device, batches, val_batches, cfg)


def starting_checkpoint(
    flags: TrainingFlags, tokenizer, path, kind: str, hint: str | None = None, run_path=None
) -> Checkpoint | None:
    """The checkpoint at `path` (None: none, start fresh), refused unless it is `kind` with this tokenizer (and,
    on --resume, unless every shape flag and structural setting given agrees with it). `run_path`: the run's own
    checkpoint when `path` is another (DPO starts from --load-from), named by the resume errors."""
    if path is None:
        return None
    resume = flags.run.resume
    if resume and run_path is None:  # the run's own file is of another kind: the name is taken, not mistyped
        hint = "--resume continues the run of that name, which another trainer wrote; choose another --run-name"
    checkpoint = check_compatible(read_checkpoint(path), path, kind, tokenizer, flags.run.tokenizer_dir, hint=hint)
    if resume:
        flags.shape.refuse_changed(checkpoint.config, run_path or path)
        refuse_changed_settings(run_path or path, structural_settings(flags.own, checkpoint))
    return checkpoint


def starting_model(flags: TrainingFlags, tokenizer, source, checkpoint: Checkpoint | None, changes=None) -> Transformer:
    """The model of a run's starting checkpoint (every tensor, its config wins over the shape flags), or a fresh one
    from the shape flags when there is none; `changes`: config fields the run sets either way."""
    if checkpoint is None:
        return Transformer(replace(flags.shape.model_config(vocab_size=len(tokenizer)), **(changes or {})))
    if changes:
        checkpoint = replace(checkpoint, config=replace(checkpoint.config, **changes))
    if not flags.run.resume:
        print(
            f"loaded all {len(checkpoint.state_dict)} tensors from {source} ({checkpoint.source}, step "
            f"{checkpoint.extra.get('step', '?')}), embedding and head included; optimizer starts fresh"
        )
    return build_model(checkpoint, source)


def structural_settings(own, checkpoint: Checkpoint) -> dict[str, tuple]:
    """flag -> (the value this command trains with, the run's stored one) for the settings besides the model shape
    that decide what a run trains (a diffusion SFT flag only when given: without it the run inherits its own). None
    means off (bidirectional, no fixed padding). `own`: the trainer's own settings."""
    settings, extra = {}, checkpoint.extra
    if getattr(own, "prompt_causal", None) is not None:  # how diffusion SFT reads the prompt: the model config
        settings["--prompt-causal"] = (own.prompt_causal, checkpoint.config.prompt_causal)
    if "sft_objective" in extra:
        if getattr(own, "block_size", None) is not None:
            settings["--block-size"] = (own.block_size or None, extra["sft_objective"].get("block_size"))
        if hasattr(own, "eos_padding_length") and "sft_eos_padding_length" in extra:
            settings["--eos-padding-length"] = (own.eos_padding_length, extra["sft_eos_padding_length"])
    elif "block_size" in extra.get("diffusion", {}) and hasattr(own, "block_size"):
        settings["--block-size"] = (own.block_size or None, extra["diffusion"]["block_size"] or None)
    if hasattr(own, "ar_loss_weight"):
        settings["--ar-loss-weight"] = (own.ar_loss_weight, (extra.get("joint") or {}).get("ar_loss_weight", 0.0))
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


def train_and_val(flags: TrainingFlags, load: Callable, what: str):
    """(training examples, validation examples) of an SFT or DPO run: --eval-data's, or the last --val-fraction of
    --data (the file order is the user's, so the split is stable). `load(path)` reads a file; `what` names its rows;
    flags.own has the run's `data` and `eval_data`."""
    data, batch_size = flags.own.data, flags.run.batch_size
    examples = load(data)
    if flags.own.eval_data:
        return examples, load(flags.own.eval_data)
    n_val = max(1, int(len(examples) * flags.run.val_fraction))
    if len(examples) - n_val < batch_size:
        raise NanoLladaError(
            f"{data}: {len(examples)} {what} are too few to hold out {n_val} and fill a batch of {batch_size}"
        )
    return examples.subset(range(len(examples) - n_val)), examples.subset(range(len(examples) - n_val, len(examples)))


def fixed_batches(examples, flags: TrainingFlags, collate: Callable) -> list:
    """The first --eval-batches batches of `examples`, the same at every evaluation."""
    size = flags.run.batch_size
    n = min(len(examples), flags.optimizer.eval_batches * size)
    return [collate(examples, range(i, min(i + size, n))) for i in range(0, n, size)]
