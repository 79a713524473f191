"""The one training loop shared by every trainer (AR and diffusion, pretraining and SFT).

A trainer supplies the model, a batch function (micro-step -> batch), validation batches and a loss
function; this loop owns everything else: AdamW, LR schedule, bf16 autocast, accumulation, clipping,
validation, early stopping, atomic checkpoints, resume, metrics jsonl, loss plot and the progress bar.

Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel (see scripts/common/distributed.py for
the global-batch rule): every rank takes its slice of the same global micro-batch k, gradients are averaged
(synchronised only on the last accumulation micro-step), validation batches are split over ranks and the loss
all-reduced, so every rank takes the same decisions; only rank 0 writes files or prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import KIND_NAMES, Checkpoint, read_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.errors import NanoLladaError
from scripts.common import distributed
from scripts.common.plots import plot_loss
from scripts.common.prefetch import Prefetcher

# loss_fn(model, batch, rng) -> scalar loss, or (loss, info) where info is a dict of plain Python values
# (e.g. the curriculum phase and block size) logged with the step. `rng` is seeded from the micro-step,
# so masks are reproducible and a resumed run sees the same ones.
LossFn = Callable[[torch.nn.Module, object, torch.Generator], "torch.Tensor | tuple[torch.Tensor, dict]"]


@dataclass
class TrainConfig:
    run_name: str
    kind: str  # "ar" | "diffusion": the kind written into checkpoints
    max_steps: int  # optimizer steps
    out_dir: str = "weights"
    learning_rate: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    lr_stable_ratio: float = 0.4  # wsd: fraction of max_steps held at the peak after warmup
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    accumulation_steps: int = 1
    eval_interval: int = 200
    eval_batches: int = 8
    save_interval: int = 500
    log_interval: int = 10
    early_stop_patience: int = 0  # evals without improvement before stopping; 0 = off
    early_stop_min_delta: float = 0.0
    dtype: str = "bfloat16"  # autocast dtype on CUDA; CPU runs fp32
    compile: bool = False
    seed: int = 42

    def validate(self) -> None:
        if self.lr_schedule not in ("cosine", "wsd", "constant"):
            raise NanoLladaError(f"--lr-schedule must be cosine, wsd or constant, got '{self.lr_schedule}'")
        if self.max_steps <= 0:
            raise NanoLladaError(
                f"nothing to train: {self.max_steps} optimizer steps (check --epochs/--max-iters, batch size and data size)"
            )
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.lr_stable_ratio <= 1:
            raise NanoLladaError("--min-lr-ratio and --lr-stable-ratio must lie in [0, 1]")
        for name in ("learning_rate", "accumulation_steps", "eval_interval", "save_interval", "log_interval"):
            if getattr(self, name) <= 0:
                raise NanoLladaError(f"--{name.replace('_', '-')} must be > 0")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr (cosine), or a plateau then linear decay to min_lr (wsd)."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, cfg.max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return peak
    if cfg.lr_schedule == "wsd":
        decay_start = min(cfg.max_steps, warmup + int(cfg.lr_stable_ratio * cfg.max_steps))
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return peak + (floor - peak) * min(1.0, progress)
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, while norms and the (tied) embedding do not (decaying them only hurts)."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (no_decay if param.dim() < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def autocast(device: torch.device, dtype: str):
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def _split(out) -> tuple[torch.Tensor, dict]:
    return out if isinstance(out, tuple) else (out, {})


def _rng(device: torch.device, *seed_parts: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(hash(seed_parts) & 0x7FFF_FFFF_FFFF)
    return gen


class RunFiles:
    def __init__(self, cfg: TrainConfig):
        out = Path(cfg.out_dir)
        self.full = out / f"{cfg.run_name}.pt"
        self.weights = out / f"{cfg.run_name}_state_dict.pt"
        self.best = out / f"{cfg.run_name}_best.pt"
        self.metrics = out / f"{cfg.run_name}_metrics.jsonl"
        self.plot = out / f"{cfg.run_name}_loss.png"


def train(
    model: torch.nn.Module,
    model_config: ModelConfig,
    cfg: TrainConfig,
    batch_fn: Callable[[int], object],
    val_batches: list,
    loss_fn: LossFn,
    tokenizer_identity: dict,
    device: torch.device,
    resume: bool = False,
    tokens_in: Callable[[object], int] = lambda batch: batch.numel(),
    to_device: Callable[[object, torch.device], object] = lambda batch, device: batch.to(device, non_blocking=True),
    extra_meta: dict | None = None,
    loss_count: Callable[[object], int] | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict:
    """Train until cfg.max_steps (or early stop); returns a summary dict. Files go to cfg.out_dir.

    loss_count(batch): what loss_fn is a mean over in a batch (default tokens_in), used only by multi-process
    runs to weight each rank's share of the global batch (see _rank_weight). on_eval(step, val_loss) runs on
    rank 0 after every evaluation (e.g. to keep the k best snapshots).
    """
    cfg.validate()
    env = distributed.init()
    # On an exception the process group is left alone: other ranks may still be inside a collective.
    summary = _train(
        model,
        model_config,
        cfg,
        batch_fn,
        val_batches,
        loss_fn,
        tokenizer_identity,
        distributed.local_device(device, env),
        env,
        resume,
        tokens_in,
        to_device,
        extra_meta,
        loss_count or tokens_in,
        on_eval,
    )
    distributed.barrier()  # every rank returns only once rank 0 has written the final files
    distributed.shutdown()
    return summary


def _rank_weight(batch, local_batch, env: distributed.Dist, loss_count) -> float:
    """N * count(shard) / count(global batch): with DDP's gradient mean, the ranks' losses then add up to the
    global-batch loss. Exact when loss_fn is a mean over what loss_count counts: packed rows (every row full, so
    tokens are proportional to rows) and losses that are a mean over rows of one padded width. A per-token mean
    over a varying number of scored tokens (AR SFT) is exact only if loss_count counts the scored tokens;
    otherwise ranks are weighted by their row share, an approximation. Losses normalised by a random count
    (LLaDA Eq. 3 after random cuts) are weighted right in expectation; they draw random masks anyway."""
    total = float(loss_count(batch))
    return env.world_size * float(loss_count(local_batch)) / total if total > 0 else 1.0


def _train(
    model,
    model_config,
    cfg,
    batch_fn,
    val_batches,
    loss_fn,
    tokenizer_identity,
    device,
    env: distributed.Dist,
    resume,
    tokens_in,
    to_device,
    extra_meta,
    loss_count,
    on_eval,
) -> dict:
    files = RunFiles(cfg)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    state = {"step": 0, "best_val": float("inf"), "best_step": -1, "bad_evals": 0}
    if resume:
        state = _resume(files.full, model, optimizer, model_config, cfg, device, verbose=env.is_main)
    elif files.full.exists():
        raise NanoLladaError(f"{files.full} already exists; pass --resume to continue it or choose another --run-name")
    if env.is_main:
        files.metrics.parent.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(files.metrics, state["step"])
    compile_model = cfg.compile and device.type == "cuda"
    eval_model = torch.compile(model) if compile_model else model
    # DDP is built after the checks above (its construction is a collective), so no rank trains while another raised.
    ddp = distributed.wrap(model, device) if env.enabled else None
    train_model = eval_model if ddp is None else (torch.compile(ddp) if compile_model else ddp)
    meta = {"train_config": asdict(cfg), **(extra_meta or {})}

    def save(path_full: bool = True) -> None:
        if not env.is_main:
            return
        extra = {
            **meta,
            "optimizer": optimizer.state_dict(),
            "step": state["step"],
            "trainer_state": dict(state),
            "world_size": env.world_size,  # informational: the step is global, so any process count can resume
            "rng": {
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {}),
            },
        }
        save_checkpoint(files.full, cfg.kind, model_config, model, tokenizer_identity, **extra)
        save_checkpoint(files.weights, cfg.kind, model_config, model, tokenizer_identity, step=state["step"], **meta)

    def evaluate() -> float:
        """Mean loss over the fixed validation batches; with N ranks, rank r scores batches r, r+N, ... with the
        same seeds as one process would, and the per-batch losses are summed over ranks: the same number."""
        eval_model.eval()
        losses = torch.zeros(len(val_batches), device=device)
        with torch.no_grad(), autocast(device, cfg.dtype):
            for i in range(env.rank, len(val_batches), env.world_size):  # fixed seeds: every eval sees the same masks
                batch = to_device(val_batches[i], device)
                losses[i] = _split(loss_fn(eval_model, batch, _rng(device, cfg.seed, -1, i)))[0].float()
        eval_model.train()
        return distributed.all_reduce_(losses).mean().item()

    def loss_rng(k: int) -> torch.Generator:
        # Ranks draw independent masks for their rows (one shared seed would repeat the same draws on every shard).
        return _rng(device, cfg.seed, k) if not env.enabled else _rng(device, cfg.seed, k, env.rank)

    metrics_file = open(files.metrics, "a", encoding="utf-8") if env.is_main else None
    log = lambda record: metrics_file and (metrics_file.write(json.dumps(record) + "\n") or metrics_file.flush())  # noqa: E731
    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc=cfg.run_name,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=not env.is_main,
    )
    say = bar.write if env.is_main else (lambda text: None)
    pending_losses: list[torch.Tensor] = []
    pending_info: list[dict] = []
    window = {"tokens": 0, "start": time.perf_counter()}

    def flush_losses(reduce: bool = True) -> None:
        """Write the per-step losses since the last flush: one host sync (and all_reduce) per log interval."""
        nonlocal pending_losses, pending_info
        if not pending_losses:
            return
        stacked = torch.stack(pending_losses)
        losses, step = (distributed.all_reduce_(stacked, "mean") if reduce else stacked).tolist(), state["step"]
        tokens_per_s = window["tokens"] / max(time.perf_counter() - window["start"], 1e-9)
        for offset, (value, info) in enumerate(zip(losses, pending_info)):
            log(
                {
                    "step": step - len(losses) + offset + 1,
                    "loss": value,
                    "lr": lr_at(step - len(losses) + offset, cfg),
                    **info,
                }
            )
        log({"step": step, "tokens_per_s": tokens_per_s})
        if env.is_main:
            bar.set_postfix(
                loss=f"{losses[-1]:.4f}",
                lr=f"{lr_at(step - 1, cfg):.2e}",
                tok_s=f"{tokens_per_s:,.0f}",
                **pending_info[-1],
            )
        pending_losses, pending_info, window["tokens"], window["start"] = [], [], 0, time.perf_counter()
        if not math.isfinite(losses[-1]):
            raise NanoLladaError(f"loss became {losses[-1]} at step {step}; lower --learning-rate or check the data")

    stopped_early = False
    train_model.train()
    batches = Prefetcher(batch_fn, stop=cfg.max_steps * cfg.accumulation_steps, pin_device=device)
    try:
        if state["step"] == 0 and val_batches:
            val = evaluate()
            log({"step": 0, "val_loss": val})
            if on_eval and env.is_main:
                on_eval(0, val)
            say(f"step 0: val loss {val:.4f}")
        while state["step"] < cfg.max_steps:
            step = state["step"]
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_info = torch.zeros((), device=device), {}
            for micro in range(cfg.accumulation_steps):
                k = step * cfg.accumulation_steps + micro
                batch = batches.get(k)  # the global micro-batch k, whatever the process count
                window["tokens"] += tokens_in(batch)
                weight = 1.0
                if env.enabled:
                    local_batch = distributed.shard(batch, env.rank, env.world_size)
                    if distributed.rows_in(local_batch) == 0:
                        raise NanoLladaError(
                            f"a batch of {distributed.rows_in(batch)} rows cannot be split over {env.world_size} processes; "
                            f"use a --batch-size of at least {env.world_size}"
                        )
                    weight, batch = _rank_weight(batch, local_batch, env, loss_count), local_batch
                # DDP all-reduces gradients in backward; only the last micro-step of an accumulation needs that.
                sync = ddp is None or micro == cfg.accumulation_steps - 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast(device, cfg.dtype):
                        loss, step_info = _split(loss_fn(train_model, to_device(batch, device), loss_rng(k)))
                        loss = loss / cfg.accumulation_steps
                        if weight != 1.0:
                            loss = loss * weight
                    loss.backward()
                step_loss += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            pending_losses.append(step_loss)
            pending_info.append(step_info)
            bar.update(1)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                flush_losses()
            if val_batches and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                val = evaluate()
                log({"step": step, "val_loss": val})
                improved = val < state["best_val"] - cfg.early_stop_min_delta  # val is all-reduced: every rank agrees
                if improved:
                    state.update(best_val=val, best_step=step, bad_evals=0)
                    if env.is_main:
                        save_checkpoint(
                            files.best,
                            cfg.kind,
                            model_config,
                            model,
                            tokenizer_identity,
                            step=step,
                            val_loss=val,
                            **meta,
                        )
                else:
                    state["bad_evals"] += 1
                if on_eval and env.is_main:
                    on_eval(step, val)
                say(f"step {step}: val loss {val:.4f} (best {state['best_val']:.4f} @ {state['best_step']})")
                if cfg.early_stop_patience and state["bad_evals"] >= cfg.early_stop_patience:
                    say(
                        f"early stop: no val improvement > {cfg.early_stop_min_delta} for {cfg.early_stop_patience} evals"
                    )
                    stopped_early = True
                    break
            if step % cfg.save_interval == 0 and step < cfg.max_steps:
                save()
                if env.is_main:
                    plot_loss(files.metrics, files.plot, cfg.run_name)
    except KeyboardInterrupt:
        # Weights change only in optimizer.step, so the last finished step can be saved and resumed exactly.
        # Ranks may be interrupted at different points, so no collective here: rank 0 logs its own shard's losses.
        flush_losses(reduce=not env.enabled)
        save()
        say(f"interrupted: saved step {state['step']} to {files.full}")
        raise
    finally:
        batches.close()
        bar.close()
        if metrics_file:
            metrics_file.close()
    save()
    if env.is_main:
        plot_loss(files.metrics, files.plot, cfg.run_name)
        print(
            f"done: step {state['step']}, best val loss {state['best_val']:.4f} @ {state['best_step']}; "
            f"wrote {', '.join(str(f) for f in (files.full, files.weights, files.best, files.metrics, files.plot) if f.exists())}"
        )
    return {
        "step": state["step"],
        "best_val": state["best_val"],
        "best_step": state["best_step"],
        "stopped_early": stopped_early,
        "files": {k: str(v) for k, v in vars(files).items()},
    }


def _resume(
    path: Path, model, optimizer, model_config: ModelConfig, cfg: TrainConfig, device, verbose: bool = True
) -> dict:
    if not path.exists():
        raise NanoLladaError(f"--resume: {path} not found; start without --resume (or check --run-name)")
    checkpoint: Checkpoint = read_checkpoint(path)
    if checkpoint.kind != cfg.kind:
        raise NanoLladaError(f"--resume: {path} is {KIND_NAMES[checkpoint.kind]} run, this trainer writes {cfg.kind}")
    if checkpoint.config != model_config:
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
    state = dict(checkpoint.extra["trainer_state"])
    if verbose:
        print(f"resumed {path} at step {state['step']} (best val {state['best_val']:.4f} @ {state['best_step']})")
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint's step so the curve has no duplicates."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
