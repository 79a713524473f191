"""The one training loop shared by every trainer (AR and diffusion, pretraining and SFT).

A trainer supplies the model and a Task: a batch function (micro-step -> batch), validation batches, a training
loss and a validation loss. This loop owns everything else: AdamW, LR schedule, bf16 autocast, accumulation,
clipping, validation, early stopping, atomic checkpoints, resume, metrics jsonl, loss plot and the progress bar.

Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel (the global-batch rule is
scripts/common/training/distributed.py's); every rank takes the same decisions, and only rank 0 writes or prints.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from model.block_attention import choose_flex
from model.errors import NanoLladaError
from scripts.common.cli import Interrupted, interrupted_before_training
from scripts.common.device import autocast, enable_tf32
from scripts.common.training import distributed
from scripts.common.training.models import Models
from scripts.common.training.optimization import TrainConfig, lr_at, make_optimizer
from scripts.common.training.plots import plot_loss
from scripts.common.training.prefetch import Prefetcher, to_device, tokens_in
from scripts.common.training.run_files import (
    CheckpointWriter,
    MetricsLog,
    RunFiles,
    TrainState,
    keep_metrics_until,
    resume,
)
from scripts.common.training.topk import TopKCheckpoints

# A batch is a tensor of token rows or a dict of tensors with "input_ids"; rows are dim 0.
# loss_fn(model, batch, rng, step) -> scalar loss, or (loss, info) where info is a dict of plain Python values
# (e.g. the curriculum phase and block size) or 0-dim tensors, logged with the step; `step` is the optimizer step.
LossFn = Callable[[torch.nn.Module, object, torch.Generator, int], "torch.Tensor | tuple[torch.Tensor, dict]"]
# val_loss_fn(model, batch, rng) -> scalar loss, scored on the fixed validation batches.
ValLossFn = Callable[[torch.nn.Module, object, torch.Generator], torch.Tensor]


@dataclass
class Task:
    """What a trainer trains on and for: the data and the objective."""

    batch_fn: Callable[[int], object]  # micro-step k -> the global micro-batch k, a pure function of k
    val_batches: list  # fixed validation batches, scored with the same masks at every evaluation
    loss_fn: LossFn
    val_loss_fn: ValLossFn
    # What loss_fn is a mean over in a batch; multi-process runs weight each rank's share of the global batch by it.
    loss_count: Callable[[object], int] = tokens_in
    explicit_masks: bool = True  # document / block masks: FlexAttention's, probed (tens of seconds) before compiling


@dataclass
class RunOptions:
    """What a run writes besides weights, and how it starts."""

    tokenizer_identity: dict
    resume: bool = False  # continue <out_dir>/<run_name>.pt
    meta: dict = field(default_factory=dict)  # the trainer's notes, stored in every checkpoint
    on_eval: Callable[[int, float], None] | None = None  # (step, val_loss) on rank 0 after every evaluation
    top_k: TopKCheckpoints | None = None  # keeps the weights of the k best evaluations (--keep-top-k)


@dataclass
class LossWindow:
    """The per-step losses since the last log line; they stay on the device until logged."""

    losses: list = field(default_factory=list)
    infos: list = field(default_factory=list)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


@dataclass
class Run:
    """A run's parts, built once by `_start`; the loop's steps read and update them."""

    cfg: TrainConfig
    task: Task
    options: RunOptions
    device: torch.device
    env: distributed.Dist
    models: Models
    optimizer: torch.optim.Optimizer
    state: TrainState
    files: RunFiles
    writer: CheckpointWriter
    metrics: MetricsLog
    bar: tqdm
    window: LossWindow = field(default_factory=LossWindow)

    def say(self, text: str) -> None:
        if self.env.is_main:
            self.bar.write(text)


def train(model: torch.nn.Module, cfg: TrainConfig, task: Task, options: RunOptions, device: torch.device) -> dict:
    """Train until cfg.max_steps (or early stop); returns a summary dict. Files go to cfg.out_dir."""
    cfg.validate()
    env = distributed.init()
    try:
        run = _start(model, cfg, task, options, distributed.local_device(device, env), env)
    except KeyboardInterrupt:
        raise interrupted_before_training(options.resume) from None
    # On an exception the process group is left alone: other ranks may still be inside a collective.
    stopped_early = _loop(run)
    _finish(run)
    distributed.barrier()  # every rank returns only once rank 0 has written the final files
    distributed.shutdown()
    state = run.state
    return {
        "step": state.step,
        "best_val": state.best_val,
        "best_step": state.best_step,
        "stopped_early": stopped_early,
        "files": {k: str(v) for k, v in vars(run.files).items()},
    }


def _start(model, cfg: TrainConfig, task: Task, options: RunOptions, device, env: distributed.Dist) -> Run:
    files = RunFiles(cfg)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    state = TrainState()
    if options.resume:
        state = resume(files.full, model, optimizer, cfg.kind, device, verbose=env.is_main)
    elif files.full.exists():
        raise NanoLladaError(f"{files.full} already exists; pass --resume to continue it or choose another --run-name")
    if env.is_main:
        files.metrics.parent.mkdir(parents=True, exist_ok=True)
        keep_metrics_until(files.metrics, state.step)
    enable_tf32(device)
    if cfg.kind == "diffusion" and task.explicit_masks:  # AR attends causally, without explicit masks
        choose_flex(model, device, say=print if env.is_main else lambda _: None)  # before anything is compiled
    # DDP is built after the checks above (its construction is a collective), so no rank trains while another raised.
    models = Models.wrap(model, cfg.compile_backend_on(device), device, env)
    meta = {"train_config": asdict(cfg), **options.meta}
    writer = CheckpointWriter(files, cfg.kind, model, options.tokenizer_identity, meta, device)
    bar_style = dict(desc=cfg.run_name, dynamic_ncols=True, mininterval=1.0)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not env.is_main, **bar_style)
    metrics = MetricsLog(files.metrics if env.is_main else None)
    return Run(cfg, task, options, device, env, models, optimizer, state, files, writer, metrics, bar)


def _loop(run: Run) -> bool:
    """Optimizer steps until max_steps; True if early stopping ended the run."""
    cfg, state = run.cfg, run.state
    run.models.train.train()
    batches = Prefetcher(run.task.batch_fn, stop=cfg.max_steps * cfg.accumulation_steps, pin_device=run.device)
    try:
        if state.step == 0 and run.task.val_batches:
            _record_eval(run, _evaluate(run))
        while state.step < cfg.max_steps:
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(state.step, cfg)
            loss, info = _forward_backward(run, batches)
            _optimizer_step(run)
            state.step += 1
            run.window.losses.append(loss)
            run.window.infos.append(info)
            run.bar.update(1)
            last = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last:
                _log_losses(run)
            if run.task.val_batches and (state.step % cfg.eval_interval == 0 or last):
                if not _record_eval(run, _evaluate(run)):
                    return True
            if state.step % cfg.save_interval == 0 and not last:
                _log_losses(run)  # every loss up to the checkpoint is in the metrics file: a resume keeps them
                _save(run)
    except KeyboardInterrupt:
        # Weights change only in optimizer.step, so the last finished step can be saved and resumed exactly.
        # Ranks may be interrupted at different points, so no collective here: rank 0 logs its own shard's losses.
        _log_losses(run, reduce=not run.env.enabled)
        _save(run, plot=False)
        if not run.env.is_main:
            raise
        raise Interrupted(
            f"interrupted: saved step {state.step} to {run.files.full}; rerun the same command with --resume "
            "to continue from it"
        ) from None
    finally:
        batches.close()
        run.bar.close()
        run.metrics.close()
    return False


def _forward_backward(run: Run, batches: Prefetcher) -> tuple[torch.Tensor, dict]:
    """Forward and backward over this step's micro-batches; the step's loss (still on the device) and info."""
    cfg, step = run.cfg, run.state.step
    step_loss, info = torch.zeros((), device=run.device), {}
    for micro in range(cfg.accumulation_steps):
        k = step * cfg.accumulation_steps + micro
        batch = batches.get(k)  # the global micro-batch k, whatever the process count
        run.window.tokens += tokens_in(batch)
        batch, weight = distributed.local_share(batch, run.env, run.task.loss_count)
        # DDP all-reduces gradients in backward; only the last micro-step of an accumulation needs that.
        sync = run.models.ddp is None or micro == cfg.accumulation_steps - 1
        with contextlib.nullcontext() if sync else run.models.ddp.no_sync():
            loss, info = run.models.first_call("train", lambda: _micro_step(run, batch, k, weight), run.say)
        step_loss += loss.detach()
    return step_loss, info


def _micro_step(run: Run, batch, k: int, weight: float) -> tuple[torch.Tensor, dict]:
    """Loss and backward of micro-batch k (on this rank's share); run again from scratch after a compile failure."""
    cfg = run.cfg
    if k % cfg.accumulation_steps == 0:  # a retried first micro-step starts without gradients, like the first try
        run.optimizer.zero_grad(set_to_none=True)
    with autocast(run.device, cfg.dtype):
        rng = _train_rng(run, k)
        out = run.task.loss_fn(run.models.train, to_device(batch, run.device), rng, run.state.step)
        loss, info = out if isinstance(out, tuple) else (out, {})
        loss = loss / cfg.accumulation_steps
        if weight != 1.0:
            loss = loss * weight
    loss.backward()
    return loss, info


def _optimizer_step(run: Run) -> None:
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.models.plain.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _log_losses(run: Run, reduce: bool = True) -> None:
    """Write the per-step losses since the last log line: one host sync (and all_reduce) per log interval."""
    window, step, cfg = run.window, run.state.step, run.cfg
    if not window.losses:
        return
    stacked = torch.stack(window.losses)
    losses = (distributed.all_reduce_(stacked, "mean") if reduce else stacked).tolist()
    tokens_per_s = window.tokens / max(time.perf_counter() - window.start, 1e-9)
    first = step - len(losses)  # the optimizer step at which the window's first loss was taken
    # 0-dim tensors of the info (the label share) are read here, once per interval, not at every step
    infos = [{key: v.item() if isinstance(v, torch.Tensor) else v for key, v in i.items()} for i in window.infos]
    for offset, (value, info) in enumerate(zip(losses, infos)):
        run.metrics.write({"step": first + offset + 1, "loss": value, "lr": lr_at(first + offset, cfg), **info})
    run.metrics.write({"step": step, "tokens_per_s": tokens_per_s})
    if run.env.is_main:
        postfix = {"loss": f"{losses[-1]:.4f}", "lr": f"{lr_at(step - 1, cfg):.2e}", "tok_s": f"{tokens_per_s:,.0f}"}
        shown = {key: f"{v:.3f}" if isinstance(v, float) else v for key, v in infos[-1].items()}
        run.bar.set_postfix(**postfix, **shown)
    run.window = LossWindow()
    if not math.isfinite(losses[-1]):
        raise NanoLladaError(f"loss became {losses[-1]} at step {step}; lower --learning-rate or check the data")


def _evaluate(run: Run) -> float:
    """Mean validation loss over the fixed batches; with N ranks, rank r scores batches r, r+N, ... with the
    same seeds as one process would, and the per-batch losses are summed over ranks: the same number."""
    return distributed.all_reduce_(run.models.first_call("eval", lambda: _val_losses(run), run.say)).mean().item()


def _val_losses(run: Run) -> torch.Tensor:
    """This rank's validation losses (zeros at the other ranks' batches)."""
    val_batches, device, env = run.task.val_batches, run.device, run.env
    run.models.eval.eval()
    losses = torch.zeros(len(val_batches), device=device)
    with torch.no_grad(), autocast(device, run.cfg.dtype):
        for i in range(env.rank, len(val_batches), env.world_size):  # fixed seeds: every eval sees the same masks
            rng = seeded_generator(device, run.cfg.seed, -1, i)
            losses[i] = run.task.val_loss_fn(run.models.eval, to_device(val_batches[i], device), rng).float()
    run.models.eval.train()
    return losses


def _record_eval(run: Run, val: float) -> bool:
    """Log an evaluation and keep the best weights; False when early stopping ends the run."""
    cfg, state = run.cfg, run.state
    run.metrics.write({"step": state.step, "val_loss": val})
    if state.step > 0:
        if val < state.best_val - cfg.early_stop_min_delta:  # val is all-reduced: every rank agrees
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            if run.env.is_main:
                run.writer.save_best(state.step, val)
        else:
            state.bad_evals += 1
        if run.options.top_k is not None and run.env.is_main:
            run.options.top_k.offer(state.step, val, lambda path: run.writer.save_best(state.step, val, path))
    if run.options.on_eval and run.env.is_main:
        run.options.on_eval(state.step, val)
    if state.step == 0:
        run.say(f"step 0: val loss {val:.4f}")
        return True
    run.say(f"step {state.step}: val loss {val:.4f} (best {state.best_val:.4f} @ {state.best_step})")
    if cfg.early_stop_patience and state.bad_evals >= cfg.early_stop_patience:
        run.say(f"early stop: no val improvement > {cfg.early_stop_min_delta} for {cfg.early_stop_patience} evals")
        return False
    return True


def _save(run: Run, plot: bool = True) -> None:
    """The full and weights-only checkpoints at this step (rank 0), and the loss plot so far."""
    if run.env.is_main:
        run.writer.save(run.optimizer, run.state, run.env.world_size)
        if plot:
            plot_loss(run.files.metrics, run.files.plot, run.cfg.run_name)


def _finish(run: Run) -> None:
    _save(run)
    if not run.env.is_main:
        return
    files, state = run.files, run.state
    kept = (files.full, files.weights, files.best, files.metrics, files.plot)
    written = ", ".join(str(f) for f in kept if f.exists())
    print(f"done: step {state.step}, best val loss {state.best_val:.4f} @ {state.best_step}; wrote {written}")


def seeded_generator(device: torch.device, *seed_parts: int) -> torch.Generator:
    """A generator seeded by integers alone (Python's str hashes differ between processes, int tuples do not), so a
    resumed run, and every rank, draws the same numbers for the same parts."""
    gen = torch.Generator(device=device)
    gen.manual_seed(hash(seed_parts) & 0x7FFF_FFFF_FFFF)
    return gen


def _train_rng(run: Run, k: int) -> torch.Generator:
    """The generator of micro-step k: masks are reproducible and a resumed run draws the same ones. Ranks draw
    independent masks for their rows (one shared seed would repeat the same draws on every shard)."""
    if not run.env.enabled:
        return seeded_generator(run.device, run.cfg.seed, k)
    return seeded_generator(run.device, run.cfg.seed, k, run.env.rank)
