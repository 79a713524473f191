"""Speed benchmark: training throughput (AR vs diffusion) and decoding speed (AR with KV cache vs diffusion samplers).

    uv run python -m scripts.bench [--device cuda|cpu] [--tiny] [--out benchmarks/results/bench_<device>_<date>.json]

Training: the default model (MiniMind2-Small shape, seq 256, batch 128) with the real losses (model/ar.py
next_token_loss, model/diffusion.py llada_loss), the real optimizer (scripts/common/trainer.make_optimizer),
bf16 autocast and torch.compile on CUDA; a few warmup steps, then timed steps. Reports tokens/s, model FLOPs
utilisation against the device's dense bf16 peak, and peak memory.
Decoding: AR greedy with KV cache vs diffusion (LLaDA low-confidence with steps = gen length; threshold parallel
decoding; threshold + prefix cache; threshold + dual cache) at each generation length and batch size. Reports
tokens/s, forward passes (NFE), tokens per forward and each fast mode's token agreement with the baseline.
Writes JSON and a markdown table (printed, and saved beside the JSON). On CPU (or --tiny) a tiny config runs
in seconds as a smoke test. Benchmarks print numbers; they assert nothing about them. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from model.ar import generate, generate_batch, next_token_loss
from model.block_diffusion import trained_block_size
from model.checkpoint import load_model, read_checkpoint
from model.config import BASE_VOCAB_SIZE, MASK_TOKEN_ID, ModelConfig, preset
from model.diffusion import llada_loss
from model.errors import NanoLladaError
from model.sampling import DiffusionSamplerConfig, diffusion_generate
from model.transformer import Transformer
from scripts.common.cli import run_main
from scripts.common.trainer import TrainConfig, autocast, make_optimizer

ROOT = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets; matched in this order
# against torch.cuda.get_device_name(). An unknown device gets MFU null rather than a guess.
BF16_PEAK_FLOPS = [
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
]


@dataclass
class BenchSettings:
    preset: str = "minimind2_small"
    seq_len: int = 256
    train_batch: int = 128
    warmup_steps: int = 5
    timed_steps: int = 20
    gen_lengths: tuple[int, ...] = (128, 256)
    decode_batches: tuple[int, ...] = (1, 32)
    prompt_len: int = 32
    block_length: int = 32
    threshold: float = 0.9
    compile: bool = True
    dtype: str = "bfloat16"


TINY = BenchSettings(
    preset="tiny",
    seq_len=32,
    train_batch=4,
    warmup_steps=1,
    timed_steps=2,
    gen_lengths=(16, 32),
    decode_batches=(1, 2),
    prompt_len=8,
    block_length=8,
    compile=False,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6 x (weights used in matmuls) + 12 x layers x hidden x seq (attention scores and mixing, forward + backward).

    The PaLM / nanoGPT convention: attention is counted in full for causal models too, embedding lookups are free,
    the (tied) LM head counts. Same formula for AR and diffusion, so their MFUs compare like for like.
    """
    h, i, layers, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_key_value_heads * config.head_dim,
    )
    matmul_weights = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + config.padded_vocab_size * h
    return 6 * matmul_weights + 12 * layers * h * seq_len


def bench_training(kind: str, config: ModelConfig, s: BenchSettings, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(run_name="bench", kind=kind, max_steps=1), device)
    forward_model = torch.compile(model) if s.compile and device.type == "cuda" else model
    data = torch.randint(1, BASE_VOCAB_SIZE, (s.train_batch, s.seq_len), device=device)
    rng = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with autocast(device, s.dtype):
            loss = (
                next_token_loss(forward_model, data)
                if kind == "ar"
                else llada_loss(forward_model, data, rng, MASK_TOKEN_ID)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer clips too (grad_clip 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_start = time.perf_counter()
    for _ in range(s.warmup_steps):
        step()
    _sync(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(s.timed_steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = s.timed_steps * s.train_batch * s.seq_len / seconds
    peak = peak_bf16_flops(device)
    achieved = tokens_per_s * training_flops_per_token(config, s.seq_len)
    return {
        "tokens_per_s": tokens_per_s,
        "step_seconds": seconds / s.timed_steps,
        "warmup_seconds": warmup_seconds,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


@torch.no_grad()
def ar_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy AR decoding with the KV cache: model/ar.generate at batch 1, model/ar.generate_batch above."""
    if prompt.shape[0] == 1:
        ids = list(generate(model, prompt[0].tolist(), new_tokens, banned_ids=(MASK_TOKEN_ID,)))
        return torch.tensor([ids], device=prompt.device), len(ids)
    rows = generate_batch(model, prompt.tolist(), new_tokens, banned_ids=(MASK_TOKEN_ID,))
    return torch.tensor(rows, device=prompt.device), new_tokens


def diffusion_modes(gen_length: int, s: BenchSettings) -> dict[str, DiffusionSamplerConfig]:
    base = DiffusionSamplerConfig(
        gen_length=gen_length, steps=gen_length, block_length=s.block_length, stop_at_eos=False
    )
    return {
        "llada_baseline": base,
        "threshold": replace(base, threshold=s.threshold),
        "threshold_prefix_cache": replace(base, threshold=s.threshold, cache="prefix"),
        "threshold_dual_cache": replace(base, threshold=s.threshold, cache="dual"),
    }


def timed(device: torch.device, dtype: str, fn):
    _sync(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def bench_decoding(diffusion_model, ar_model, s: BenchSettings, device: torch.device) -> list[dict]:
    rows = []
    for gen_length in s.gen_lengths:
        for batch in s.decode_batches:
            prompt = torch.randint(
                1, BASE_VOCAB_SIZE, (batch, s.prompt_len), generator=torch.Generator().manual_seed(batch)
            ).to(device)
            runs = {"ar_kv_cache": lambda: ar_decode(ar_model, prompt, gen_length)}
            for name, cfg in diffusion_modes(gen_length, s).items():
                runs[name] = lambda cfg=cfg: (lambda out: (out.tokens, out.nfe))(
                    diffusion_generate(diffusion_model, prompt, cfg, MASK_TOKEN_ID)
                )
            baseline = None
            for name, run in runs.items():
                if device.type == "cuda":
                    timed(device, s.dtype, run)  # warm the kernels for this shape
                (tokens, nfe), seconds = timed(device, s.dtype, run)
                if name == "llada_baseline":
                    baseline = tokens
                rows.append(
                    {
                        "mode": name,
                        "gen_length": gen_length,
                        "batch": batch,
                        "seconds": seconds,
                        "tokens_per_s": batch * gen_length / seconds,
                        "nfe": nfe,
                        "tokens_per_forward": gen_length / nfe,
                        "agreement_with_baseline": None
                        if name == "ar_kv_cache" or baseline is None
                        else (tokens == baseline).float().mean().item(),
                    }
                )
            base_rate = next(
                r["tokens_per_s"]
                for r in rows
                if r["mode"] == "llada_baseline" and r["gen_length"] == gen_length and r["batch"] == batch
            )
            ar_rate = next(
                r["tokens_per_s"]
                for r in rows
                if r["mode"] == "ar_kv_cache" and r["gen_length"] == gen_length and r["batch"] == batch
            )
            for r in rows[-len(runs) :]:
                r["speedup_vs_baseline"], r["speed_vs_ar"] = r["tokens_per_s"] / base_rate, r["tokens_per_s"] / ar_rate
    return rows


def git_commit() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # Earlier results in benchmarks/results do not make the code dirty.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(dirty)}


def markdown(report: dict) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"# nano-llada benchmark: {report['device']} ({report['date']})", ""]
    if report["smoke_test"]:
        lines += ["**Smoke test: tiny config, not a measurement of the default model.**", ""]
    lines += [
        f"torch {report['torch']}, commit {str(report['git']['commit'])[:10]}{' (dirty)' if report['git']['dirty'] else ''}, "
        f"model preset `{report['settings']['preset']}` ({report['model_parameters'] / 1e6:.1f}M parameters), "
        f"decoding with diffusion weights: {report['diffusion_weights']} "
        f"({ModelConfig.from_dict(report['decoding_model_config']).num_parameters() / 1e6:.1f}M parameters)",
        "",
    ]
    t = report["training"]
    lines += (
        []
        if not t
        else [
            f"## Training (seq {report['settings']['seq_len']}, batch {report['settings']['train_batch']}, "
            f"{report['settings']['dtype'] if report['device_type'] == 'cuda' else 'float32'}, compile {report['compiled']})",
            "",
            "| route | tokens/s | step ms | TFLOP/s | MFU | peak memory GiB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    )
    for route in ("ar", "diffusion") if t else ():
        r = t[route]
        lines.append(
            f"| {route} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_seconds']:.1f} | {r['achieved_tflops']:.2f} | "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {fmt(r['peak_memory_gib'], '.2f')} |"
        )
    lines += (["", f"diffusion / AR tokens/s: {t['diffusion_vs_ar']:.3f}"] if t else []) + [
        "",
        f"## Decoding (prompt {report['settings']['prompt_len']}, block {report['settings']['block_length']}, "
        f"threshold {report['settings']['threshold']}, greedy)",
        "",
        "| new tokens | batch | mode | tokens/s | NFE | tokens/forward | vs baseline | vs AR | agreement |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["decoding"]:
        lines.append(
            f"| {r['gen_length']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:,.1f} | {r['nfe']} | {r['tokens_per_forward']:.2f} | "
            f"{r['speedup_vs_baseline']:.2f}x | {r['speed_vs_ar']:.2f}x | {fmt(r['agreement_with_baseline'] and 100 * r['agreement_with_baseline'], '.1f')}"
            f"{'%' if r['agreement_with_baseline'] is not None else ''} |"
        )
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config smoke test (always on for CPU)")
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/results/bench_<device>_<date>.json")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="a trained diffusion checkpoint for the decoding figures (agreement means more)",
    )
    parser.add_argument("--ar-checkpoint", default=None, help="a trained AR checkpoint for the AR decoding row")
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    settings = TINY if args.tiny or device.type == "cpu" else BenchSettings()
    settings = replace(
        settings, compile=settings.compile and not args.no_compile, threshold=args.threshold or settings.threshold
    )
    config = preset(settings.preset)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    notes = []
    if device.type == "cpu" or args.tiny:
        notes.append("CPU/tiny smoke test: checks that the benchmark runs; its numbers say nothing about GPU speed.")

    training = {}
    if not args.skip_training:
        for kind in ("ar", "diffusion"):
            print(f"training {kind} ...", flush=True)
            training[kind] = bench_training(kind, config, settings, device)
        training["diffusion_vs_ar"] = training["diffusion"]["tokens_per_s"] / training["ar"]["tokens_per_s"]

    if args.checkpoint:
        block = trained_block_size(read_checkpoint(args.checkpoint).extra)
        if (
            block
        ):  # its decoding is block-causal, which the modes compared here (bidirectional, Fast-dLLM caches) are not
            raise NanoLladaError(
                f"{args.checkpoint} was trained with block diffusion (block {block}); this benchmark compares "
                f"bidirectional decoding modes: time it with `scripts.eval.eval_diffusion` instead"
            )
        diffusion_model, diffusion_config = load_model(args.checkpoint, kind="diffusion", device=device)
    else:
        torch.manual_seed(0)
        diffusion_model, diffusion_config = Transformer(config).to(device).eval(), config
        notes.append(
            "Random-weight diffusion model: its confidences are near-uniform, so threshold decoding commits about one "
            "token per step and agreement with the baseline says little; pass --checkpoint for meaningful numbers."
        )
    if args.ar_checkpoint:
        ar_model, _ = load_model(args.ar_checkpoint, kind="ar", device=device)
    else:
        torch.manual_seed(1)
        ar_model = Transformer(diffusion_config).to(device).eval()
    print("decoding ...", flush=True)
    decoding = bench_decoding(diffusion_model, ar_model, settings, device)

    date = datetime.date.today().isoformat()
    report = {
        "device": device_name,
        "device_type": device.type,
        "date": date,
        "smoke_test": device.type == "cpu" or args.tiny,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git_commit(),
        "settings": asdict(settings),
        "model_config": config.to_dict(),
        "model_parameters": config.num_parameters(),
        "compiled": settings.compile and device.type == "cuda",
        "peak_bf16_tflops": (peak_bf16_flops(device) or 0) / 1e12 or None,
        "flops_per_token_training": training_flops_per_token(config, settings.seq_len),
        "diffusion_weights": args.checkpoint or "random",
        "decoding_model_config": diffusion_config.to_dict(),
        "training": training,
        "decoding": decoding,
        "notes": notes,
    }
    slug = (
        "cpu"
        if device.type == "cpu"
        else re.sub(r"[^a-z0-9]+", "_", device_name.lower().replace("nvidia", "")).strip("_")
    )
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_{slug}_{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    run_main(main)
