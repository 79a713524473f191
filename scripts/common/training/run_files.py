"""What a training run writes and reads back: its file names, the state a resume needs, the metrics jsonl.

`<run>.pt` is everything needed to continue exactly (weights, optimizer, RNG, TrainState); `<run>_state_dict.pt`
the weights alone; `<run>_best.pt` the weights of the best evaluation; `<run>_metrics.jsonl` one record a line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model.checkpoint import KIND_NAMES, read_checkpoint, save_checkpoint
from model.errors import NanoLladaError


@dataclass
class TrainState:
    """What a resumed run needs besides weights, optimizer and RNG to continue as if it had never stopped."""

    step: int = 0  # optimizer steps taken; also the data position (micro-batch k = step * accumulation + micro)
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0  # evaluations in a row without improvement, for early stopping


class RunFiles:
    def __init__(self, cfg):
        out = Path(cfg.out_dir)
        self.full = out / f"{cfg.run_name}.pt"
        self.weights = out / f"{cfg.run_name}_state_dict.pt"
        self.best = out / f"{cfg.run_name}_best.pt"
        self.metrics = out / f"{cfg.run_name}_metrics.jsonl"
        self.plot = out / f"{cfg.run_name}_loss.png"


@dataclass
class CheckpointWriter:
    """Writes the run's checkpoints; every one carries `meta` (train config and the trainer's own notes)."""

    files: RunFiles
    kind: str
    model: torch.nn.Module
    tokenizer_identity: dict
    meta: dict
    device: torch.device

    def save(self, optimizer: torch.optim.Optimizer, state: TrainState, world_size: int) -> None:
        """The full checkpoint (for --resume) and the weights-only one, both at `state.step`."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        resume = {
            "optimizer": optimizer.state_dict(),
            "step": state.step,
            "trainer_state": asdict(state),
            "world_size": world_size,  # informational: the step is global, so any process count can resume
            "rng": rng,
        }
        self._write(self.files.full, **self.meta, **resume)
        self._write(self.files.weights, step=state.step, **self.meta)

    def save_best(self, step: int, val_loss: float, path: Path | None = None) -> None:
        """The weights of an evaluation: the best so far at <run>_best.pt, or one of the top k at `path`."""
        self._write(path or self.files.best, step=step, val_loss=val_loss, **self.meta)

    def _write(self, path: Path, **extra) -> None:
        # torch.save reports an unwritable file or a full disk as a RuntimeError; the write is atomic, so the
        # checkpoint already at `path` (if any) is whole.
        try:
            save_checkpoint(path, self.kind, self.model.config, self.model, self.tokenizer_identity, **extra)
        except (OSError, RuntimeError) as err:
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
            raise NanoLladaError(
                f"cannot write {path} ({reason}); earlier checkpoints are intact: make --save-dir writable or "
                f"free space, then rerun (with --resume if {self.files.full} was saved before)"
            ) from None


def resume(path: Path, model, optimizer, kind: str, device: torch.device, verbose: bool = True) -> TrainState:
    """Load weights, optimizer and RNG of a full checkpoint into this run; its TrainState."""
    if not path.exists():
        raise NanoLladaError(f"--resume: {path} not found; start without --resume (or check --run-name)")
    checkpoint = read_checkpoint(path)
    if checkpoint.kind != kind:
        raise NanoLladaError(f"--resume: {path} is {KIND_NAMES[checkpoint.kind]} run, this trainer writes {kind}")
    if checkpoint.config != model.config:
        raise NanoLladaError(
            f"--resume: {path} has model config {checkpoint.config}, which differs from this run's; use the same flags"
        )
    if "optimizer" not in checkpoint.extra:
        raise NanoLladaError(f"--resume: {path} is a weights-only checkpoint; resume needs the full <run>.pt")
    model.load_state_dict(checkpoint.state_dict)
    model.to(device)
    optimizer.load_state_dict(checkpoint.extra["optimizer"])
    rng = checkpoint.extra.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    state = TrainState(**checkpoint.extra["trainer_state"])
    if verbose:
        print(f"resumed {path} at step {state.step} (best val {state.best_val:.4f} @ {state.best_step})")
    return state


class MetricsLog:
    """The metrics jsonl, one record a line. Each line is flushed as it is written, so the file can be read (and
    plotted) while the run is alive and keeps every logged step when the process dies."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None  # None: a rank that logs nothing

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def keep_metrics_until(path: Path, step: int) -> None:
    """Before a run (re)starts at `step`: keep the records of steps <= step, so a resumed run's curve covers the
    whole run, and drop the later ones, which the resumed run logs again. A line cut short by a killed process
    is dropped too. A run starting at step 0 starts a new file."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
