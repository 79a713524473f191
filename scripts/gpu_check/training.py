"""The training and bench stages of the GPU check: each route through its real entry point, in this process (so
Dynamo's graph counters and CUDA's peak memory are readable), on a corpus it writes (or --data); checkpoints and
the corpus go to --work, logs to --out."""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.objectives.masking import crop_lengths
from model.tokenizer import load_tokenizer
from scripts.common.bench.report import peak_bf16_flops
from scripts.common.bench.training import training_flops_per_token
from scripts.gpu_check.report import Context
from scripts.memory_estimate import step_memory

TINY_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass
class Route:
    name: str
    entry: str  # "ar" (scripts.train.train_pretrain) or "diffusion" (scripts.train.diffusion)
    flags: list[str] = field(default_factory=list)
    compiled: bool = True
    block_diffusion: bool = False
    max_graphs: int = 2  # training and evaluation graphs (FlexAttention's probe adds one)
    seed_route: bool = False  # one of the seed commands' routes: held to --min-tokens-per-s


def routes(ctx: Context) -> list[Route]:
    seq, block = ctx.shared["seq_len"], 32 if ctx.cuda else 8
    crops = len(crop_lengths(seq, 1)) - 1  # bucketed crop lengths below the full row (model.objectives.masking)
    no_crop = ["--variable-length-prob", "0"]
    blocks = ["--block-size", str(block), "--use-doc-attention-mask", *no_crop]
    return [  # most valuable first: a cut stage still has the seed routes
        Route("ar", "ar", seed_route=True),
        Route("mdlm", "diffusion", no_crop, seed_route=True),
        Route("mdlm_eager", "diffusion", [*no_crop, "--no-compile"], compiled=False),
        Route("bdlm32_doc_flex", "diffusion", blocks, block_diffusion=True, max_graphs=3),
        Route("mdlm_crop", "diffusion", ["--variable-length-prob", "0.3"], max_graphs=2 + crops),
    ]


def synthetic_corpus(path: Path, tokenizer, tokens: int, seed: int = 0) -> Path:
    """Documents (one a line) walked from a random Markov chain over 500 of the tokenizer's pieces: a structure a
    model learns within a few steps, so a short run's loss falls; nothing to download or copy along."""
    rng = np.random.default_rng(seed)
    pieces = [tokenizer.decode([i]) for i in range(300, 3000)]
    pieces = [p for p in pieces if p.strip() and "\ufffd" not in p and "\n" not in p][:500]
    successors = rng.integers(0, len(pieces), (len(pieces), 3))
    lines, total = [], 0
    while total < tokens:
        length, word, words = int(rng.integers(16, 160)), int(rng.integers(len(pieces))), []
        for _ in range(length):
            words.append(pieces[word])
            jump = rng.random() < 0.1
            word = int(rng.integers(len(pieces))) if jump else int(successors[word, rng.integers(3)])
        lines.append("".join(words))
        total += length
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def route_argv(ctx: Context, route: Route, steps: int) -> list[str]:
    a, s = ctx.args, ctx.shared
    argv = ["--data", str(s["data"]), "--tokenizer-dir", a.tokenizer_dir, "--save-dir", str(ctx.work / "weights")]
    argv += ["--run-name", route.name, "--max-seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"])]
    argv += ["--max-iters", str(steps), "--log-interval", str(max(1, steps // 6)), "--eval-interval", str(steps)]
    argv += ["--eval-batches", "1", "--save-interval", "1000000", "--warmup-steps", "2", "--learning-rate", "1e-3"]
    argv += ["--device", ctx.device.type, "--seed", "42"]
    if not ctx.cuda:
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY_SHAPE.items()]
    if route.entry == "diffusion":
        ar_weights = ctx.work / "weights" / "ar_state_dict.pt"  # the seed pipeline: diffusion starts from the AR model
        argv = ["--train", *argv, *(["--init-from-minimind", str(ar_weights)] if ar_weights.exists() else [])]
    return argv + route.flags


def run_route(ctx: Context, route: Route, steps: int) -> dict:
    """One run through the entry point; its console output goes to <out>/<route>.log."""
    from scripts.train import diffusion, train_pretrain

    main = train_pretrain.main if route.entry == "ar" else diffusion.main
    for suffix in (".pt", "_best.pt", "_state_dict.pt", "_metrics.jsonl", "_loss.png"):  # a rerun starts afresh
        (ctx.work / "weights" / f"{route.name}{suffix}").unlink(missing_ok=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    log_path = ctx.out / f"{route.name}.log"
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        summary = main(route_argv(ctx, route, steps))
    result = {"wall_s": time.perf_counter() - start, "steps": summary["step"]}
    result["unique_graphs"] = int(counters["stats"]["unique_graphs"])
    result["graph_breaks"] = int(sum(counters["graph_break"].values()))
    if ctx.cuda:
        result["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    text = log_path.read_text(encoding="utf-8", errors="replace")
    result["attention_line"] = next((x for x in text.splitlines() if x.startswith("attention:")), None)
    result["compile_fallback"] = "torch.compile failed" in text
    metrics = [json.loads(x) for x in Path(summary["files"]["metrics"]).read_text().splitlines()]
    return result | window_speeds(ctx, route, metrics)


def window_speeds(ctx: Context, route: Route, metrics: list[dict]) -> dict:
    """Loss first -> last and tokens/s per logged window; the first window (compilation, step-0 evaluation) is
    reported apart, as the slowest."""
    losses = [m["loss"] for m in metrics if "loss" in m]
    quarter = max(1, len(losses) // 4)  # means of the first and last quarter: one diffusion step's loss is noisy
    speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    steady = speeds[1:] or speeds
    median = statistics.median(steady)
    tokens_per_step = ctx.shared["batch_size"] * ctx.shared["seq_len"]
    out = {"first_loss": statistics.mean(losses[:quarter]), "last_loss": statistics.mean(losses[-quarter:])}
    out["tokens_per_s"] = median
    out |= {"min_tokens_per_s": min(steady), "max_tokens_per_s": max(steady), "first_window_tokens_per_s": speeds[0]}
    out["ms_per_step"] = 1e3 * tokens_per_step / median
    peak = peak_bf16_flops(ctx.device)
    flops = flops_per_token(ctx.shared["config"], ctx.shared["seq_len"], route.block_diffusion)
    out["mfu"] = median * flops / peak if peak else None
    return out


def flops_per_token(config: ModelConfig, seq_len: int, block_diffusion: bool) -> float:
    """The bench's count per scored token; block diffusion runs 2L tokens through the layers (the head sees L)."""
    if not block_diffusion:
        return training_flops_per_token(config, seq_len)
    return 2 * training_flops_per_token(config, 2 * seq_len) - 6 * config.padded_vocab_size * config.hidden_size


def training_stage(ctx: Context) -> None:
    a = ctx.args
    ctx.shared["seq_len"] = a.seq_len or (256 if ctx.cuda else 32)
    ctx.shared["batch_size"] = a.batch_size or (128 if ctx.cuda else 8)
    tokenizer = load_tokenizer(a.tokenizer_dir)
    shape = {} if ctx.cuda else TINY_SHAPE  # CUDA: the seed commands' shape (ModelConfig's defaults)
    ctx.shared["config"] = ModelConfig(**shape, vocab_size=len(tokenizer))
    tokens = 300_000 if ctx.cuda else 6_000
    ctx.shared["data"] = Path(a.data) if a.data else synthetic_corpus(ctx.work / "corpus.txt", tokenizer, tokens)
    steps = a.steps or (30 if ctx.cuda else 12)
    results = {}
    for route in routes(ctx):
        n = steps if route.compiled else max(2, steps // 2)
        result = ctx.guarded(route.name, lambda route=route, n=n: run_route(ctx, route, n), 30 if ctx.cuda else 2)
        if result is not None:
            results[route.name] = result
            judge_route(ctx, route, result)
            ctx.report.stage_result("training", routes=results)
    if "mdlm" in results and "mdlm_eager" in results:
        ratio = results["mdlm"]["tokens_per_s"] / results["mdlm_eager"]["tokens_per_s"]
        ctx.verdict("compiled_vs_eager", ratio > 1 or not ctx.cuda, f"mdlm compiled / eager tokens/s: {ratio:.2f}x")


def judge_route(ctx: Context, route: Route, r: dict) -> None:
    name = route.name
    mfu = f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] else ""
    detail = (
        f"{r['tokens_per_s']:,.0f} tok/s (min {r['min_tokens_per_s']:,.0f}, max {r['max_tokens_per_s']:,.0f}, "
        f"first window {r['first_window_tokens_per_s']:,.0f}), {r['ms_per_step']:.1f} ms/step{mfu}, "
        f"wall {r['wall_s']:.1f} s incl. compile"
    )
    ctx.verdict(f"{name}.ran", r["steps"] > 0, detail, **r)
    falls = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} (means of the first and last quarter of the steps)"
    ctx.verdict(f"{name}.loss_falls", r["last_loss"] < r["first_loss"], falls)
    if route.compiled and ctx.cuda:
        ok = not r["compile_fallback"] and 0 < r["unique_graphs"] <= route.max_graphs
        graphs = f"{r['unique_graphs']} graphs (at most {route.max_graphs}), {r['graph_breaks']} graph breaks"
        ctx.verdict(f"{name}.compiled", ok, graphs + (", FELL BACK TO EAGER" if r["compile_fallback"] else ""))
    elif route.compiled:
        ctx.check("SKIP", f"{name}.compiled", "CPU mode trains uncompiled (inductor is CUDA's here)")
    if route.block_diffusion:
        line = r["attention_line"] or "no attention: line"
        if ctx.cuda:
            ctx.verdict(f"{name}.attention", line.startswith("attention: FlexAttention"), line)
        else:
            ctx.check("SKIP", f"{name}.attention", "CPU mode: explicit masks train on SDPA, nothing to probe")
    elif route.entry == "diffusion":
        ctx.verdict(f"{name}.no_probe", r["attention_line"] is None, "no FlexAttention probe without explicit masks")
    if ctx.cuda:
        judge_cuda_speed(ctx, route, r)


def judge_cuda_speed(ctx: Context, route: Route, r: dict) -> None:
    config, s = ctx.shared["config"], ctx.shared
    loss = "compiled" if route.compiled else "chunked"
    estimate = step_memory(config, s["batch_size"], s["seq_len"], route.block_diffusion, loss).total / 2**30
    ok = r["peak_gib"] <= 1.1 * estimate
    ctx.verdict(f"{route.name}.memory", ok, f"peak {r['peak_gib']:.2f} GiB, estimate {estimate:.2f} GiB")
    if route.seed_route:
        need = ctx.args.min_tokens_per_s
        ctx.verdict(f"{route.name}.speed", r["tokens_per_s"] >= need, f"{r['tokens_per_s']:,.0f} tok/s >= {need:,.0f}")


def bench_stage(ctx: Context) -> None:
    """scripts.bench's training table (CUDA: MiniMind2-Small, batch 128 x 256, compiled; CPU: its --tiny run)."""
    from scripts import bench

    argv = ["--device", ctx.device.type, "--out", str(ctx.out / "bench" / "bench.json")]
    if not ctx.cuda:  # the smoke run: random tiny models, its card cut to one prompt
        argv += "--tiny --prompts 1 --questions 1 --lengths 8 --batches 1 --thresholds 0.9".split()
    with open(ctx.out / "bench.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        report = bench.main(argv)
    training = report["training"]
    for kind in ("ar", "diffusion"):
        t = training[kind]
        mfu = f", MFU {100 * t['mfu']:.1f} %" if t["mfu"] else ""
        peak = f", peak {t['peak_memory_gib']:.2f} GiB" if t["peak_memory_gib"] is not None else ""
        detail = f"{t['tokens_per_s']:,.0f} tok/s{mfu}{peak}, compiled: {str(t['compiled']).lower()}"
        ctx.verdict(f"training.{kind}", t["compiled"] or not ctx.cuda, detail, **t)
    ctx.check("PASS", "diffusion_vs_ar", f"{training['diffusion_vs_ar']:.2f}")
    ctx.report.stage_result("bench", training=training)
