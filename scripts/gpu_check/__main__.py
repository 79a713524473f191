"""The prepared GPU check: one command for whoever has ten minutes of a GPU.

    python -m scripts.gpu_check --out DIR [--work DIR] [--budget-s 540] [--stages env,kernels,training,...]

Stages, most valuable first, each under its own time limit (a cut stage says SKIP and the next one starts):
  env       driver, torch, CUDA; an NVIDIA device that CUDA cannot use stops the check at once, with the reason
  kernels   the fused SDPA backends each attention call site gets with the math kernel excluded; FlexAttention
            against expanded-head SDPA (outputs, gradients, time); the cross-entropy variants (value, gradient, time)
  training  the real entry points (scripts.train.train_pretrain, scripts.train.diffusion) for a short compiled run per
            route on a corpus written in-process: tokens/s, MFU, peak memory against scripts.memory_estimate, distinct
            graphs, the `attention:` line, a falling loss; one eager run; one run that crops
  decoding  KV-cached against uncached decoding (bf16 on CUDA), ms per forward per diffusion mode
  bench     scripts.bench's training table
Every result is a line `PASS|FAIL|SKIP stage.name: detail`; DIR/gpu_check.json is rewritten after every line.
Without CUDA the same command runs a CPU mode (tiny shapes, the stages that apply). It needs only torch, numpy,
tokenizers/transformers, tqdm and matplotlib: no uv, no network, no prepared data. Exit status 1 if any FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from scripts.gpu_check.report import Context, Report, StageTimeout, one_line, time_limit

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is read from --tokenizer-dir; never wait on a network

# Seconds per stage on CUDA (within --budget-s, which caps the total) and in the CPU mode.
CUDA_LIMITS = {"env": 15, "kernels": 90, "training": 290, "decoding": 45, "bench": 120}
CPU_LIMITS = {"env": 15, "kernels": 60, "training": 120, "decoding": 60, "bench": 60}
STAGES = tuple(CUDA_LIMITS)
ALARM_GRACE_S = 5.0  # past a stage's limit before the alarm cuts it (its own checks stop at the limit)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, the logs and the bench's table")
    p.add_argument(
        "--work", help="folder for the corpus and checkpoints (default: a temporary one, removed at the end)"
    )
    p.add_argument("--device", default=None, help="cuda (default when usable) or cpu (the CPU mode)")
    p.add_argument("--budget-s", type=float, default=540, help="total seconds; each stage gets at most what is left")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--data", default=None, help="a .jsonl/.txt corpus (default: one synthesised in DIR)")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per compiled route (CUDA 30, CPU 4)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step (CUDA 128, CPU 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (CUDA 256, CPU 32)")
    p.add_argument("--min-tokens-per-s", type=float, default=1e6, help="the AR / MDLM speed a CUDA run must reach")
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return args


def stage_functions() -> dict:
    """Imported here, so `--help` and the environment check run before the heavier imports."""
    from scripts.gpu_check.decoding import decoding_stage
    from scripts.gpu_check.kernels import env_stage, kernels_stage
    from scripts.gpu_check.training import bench_stage, training_stage

    return dict(
        env=env_stage, kernels=kernels_stage, training=training_stage, decoding=decoding_stage, bench=bench_stage
    )


def run_stage(ctx: Context, name: str, fn, limit: float) -> None:
    ctx.stage, start = name, time.monotonic()
    ctx.deadline = start + limit
    print(f"== {name} (limit {limit:.0f} s)", flush=True)
    status = "done"
    try:
        with time_limit(limit + ALARM_GRACE_S):  # the stage's own checks stop at the deadline; this is the backstop
            fn(ctx)
    except StageTimeout:
        status = "cut"
        ctx.check("SKIP", "time_limit", f"stopped after {limit:.0f} s; what it measured before is above")
    except Exception as err:  # a stage's own bug: say it and go on to the next stage
        status = "error"
        ctx.check("FAIL", "stage", one_line(err))
    ctx.report.stage_result(name, status=status, seconds=round(time.monotonic() - start, 1), limit_s=limit)


def run_stages(ctx: Context, args) -> None:
    """Every asked stage in order (the environment first), each within its limit and what is left of --budget-s."""
    limits = CUDA_LIMITS if ctx.cuda else CPU_LIMITS
    end = time.monotonic() + args.budget_s
    functions = stage_functions()
    for name in ["env", *[s for s in args.stages if s != "env"]]:
        left = end - time.monotonic()
        if left < 5:
            ctx.stage = name
            ctx.check("SKIP", "stage", f"--budget-s {args.budget_s:.0f} spent before this stage")
            continue
        run_stage(ctx, name, functions[name], min(limits[name], left))
        if ctx.shared.get("stop"):  # the environment cannot run the rest (an unusable GPU)
            break


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    report = Report(out / "gpu_check.json", {"command": sys.argv, "mode": device.type, "args": vars(args)})
    with contextlib.ExitStack() as cleanup:  # a temporary --work folder goes when the check ends, however it ends
        work = Path(args.work or cleanup.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        work.mkdir(parents=True, exist_ok=True)
        report.record["work"] = str(work)
        run_stages(Context(out, device, args, report, work), args)
    counts = report.counts()
    print(f"== summary: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP; {report.path}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
