"""Speed benchmark: training throughput (AR vs diffusion) and decoding speed (AR with KV cache vs diffusion samplers).

    uv run python -m scripts.bench [--device cuda|cpu] [--tiny] [--out benchmarks/results/bench_<device>_<date>.json]

Training: the default model (MiniMind2-Small shape, seq 256, batch 128) with the real losses (model/ar.py
next_token_loss, model/diffusion_loss.py diffusion_loss), the real optimizer
(scripts/common/optimization.make_optimizer), bf16 autocast and torch.compile on CUDA; a few warmup steps, then
timed steps. Reports tokens/s, model FLOPs utilisation against the device's dense bf16 peak, and peak memory.
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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from model.ar import ARSamplerConfig, generate, generate_batch, next_token_loss
from model.checkpoint import load_model, read_checkpoint
from model.config import BASE_VOCAB_SIZE, ModelConfig, preset
from model.diffusion_loss import diffusion_loss
from model.errors import NanoLladaError
from model.sampling import DiffusionSamplerConfig, diffusion_generate, sampler_for_checkpoint
from model.transformer import Transformer
from scripts.common.bench_report import ROOT, git_commit, markdown, peak_bf16_flops
from scripts.common.cli import run_main
from scripts.common.device import autocast, synchronize
from scripts.common.optimization import TrainConfig, make_optimizer


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
    block_size: int = 32
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
    block_size=8,
    compile=False,
)


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
                else diffusion_loss(forward_model, data, rng, mask_id_of(config))
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer clips too (grad_clip 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_start = time.perf_counter()
    for _ in range(s.warmup_steps):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(s.timed_steps):
        step()
    synchronize(device)
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


def mask_id_of(config: ModelConfig) -> int:
    """<|mask|> is the last id of a model's vocabulary (model.tokenizer.load_tokenizer appends it there); the
    benchmark has no tokenizer, so it reads the id from the model's config."""
    return config.vocab_size - 1


@torch.no_grad()
def ar_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, int]:
    """Greedy AR decoding with the KV cache: model/ar.generate at batch 1, model/ar.generate_batch above."""
    greedy = ARSamplerConfig(banned_ids=(mask_id_of(model.config),))
    if prompt.shape[0] == 1:
        ids = list(generate(model, prompt[0].tolist(), new_tokens, greedy))
        return torch.tensor([ids], device=prompt.device), len(ids)
    rows = generate_batch(model, prompt.tolist(), new_tokens, greedy)
    return torch.tensor(rows, device=prompt.device), new_tokens


def diffusion_modes(gen_length: int, s: BenchSettings) -> dict[str, DiffusionSamplerConfig]:
    base = DiffusionSamplerConfig(gen_length=gen_length, steps=gen_length, block_size=s.block_size, stop_at_eos=False)
    return {
        "llada_baseline": base,
        "threshold": replace(base, threshold=s.threshold),
        "threshold_prefix_cache": replace(base, threshold=s.threshold, cache="prefix"),
        "threshold_dual_cache": replace(base, threshold=s.threshold, cache="dual"),
    }


def timed(device: torch.device, dtype: str, fn):
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, dtype):
        out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def decoding_row(name: str, gen_length: int, batch: int, seconds: float, nfe: int, agreement) -> dict:
    return {
        "mode": name,
        "gen_length": gen_length,
        "batch": batch,
        "seconds": seconds,
        "tokens_per_s": batch * gen_length / seconds,
        "nfe": nfe,
        "tokens_per_forward": gen_length / nfe,
        "agreement_with_baseline": agreement,
    }


def bench_decoding(diffusion_model, ar_model, s: BenchSettings, device: torch.device) -> list[dict]:
    """One row per generation length, batch size and mode, with its speed relative to the baseline and to AR."""
    mask_id, rows = mask_id_of(diffusion_model.config), []
    for gen_length in s.gen_lengths:
        for batch in s.decode_batches:
            prompt = torch.randint(
                1, BASE_VOCAB_SIZE, (batch, s.prompt_len), generator=torch.Generator().manual_seed(batch)
            ).to(device)
            runs = {"ar_kv_cache": lambda: ar_decode(ar_model, prompt, gen_length)}
            for name, sampler in diffusion_modes(gen_length, s).items():
                runs[name] = lambda sampler=sampler: (lambda out: (out.tokens, out.nfe))(
                    diffusion_generate(diffusion_model, prompt, sampler, mask_id)
                )
            here, baseline = [], None
            for name, run in runs.items():
                if device.type == "cuda":
                    timed(device, s.dtype, run)  # warm the kernels for this shape
                (tokens, nfe), seconds = timed(device, s.dtype, run)
                baseline = tokens if name == "llada_baseline" else baseline
                agreement = None
                if baseline is not None and name != "ar_kv_cache":
                    agreement = (tokens == baseline).float().mean().item()
                here.append(decoding_row(name, gen_length, batch, seconds, nfe, agreement))
            rate = {r["mode"]: r["tokens_per_s"] for r in here}
            for r in here:
                r["speedup_vs_baseline"] = r["tokens_per_s"] / rate["llada_baseline"]
                r["speed_vs_ar"] = r["tokens_per_s"] / rate["ar_kv_cache"]
            rows += here
    return rows


def parse_args(argv=None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def decoding_models(args, settings: BenchSettings, config: ModelConfig, device: torch.device, notes: list[str]):
    """(diffusion model, AR model) for the decoding rows: the checkpoints given, else random weights."""
    if args.checkpoint:
        sampler = sampler_for_checkpoint(
            read_checkpoint(args.checkpoint), diffusion_modes(1, settings)["llada_baseline"]
        )
        if sampler.block_causal:  # the modes compared here (bidirectional, Fast-dLLM caches) do not apply to it
            raise NanoLladaError(
                f"{args.checkpoint} was trained with block diffusion (block {sampler.block_size}); this benchmark "
                f"compares bidirectional decoding modes: time it with `scripts.eval.eval_diffusion` instead"
            )
        diffusion_model, _ = load_model(args.checkpoint, kind="diffusion", device=device)
    else:
        torch.manual_seed(0)
        diffusion_model = Transformer(config).to(device).eval()
        notes.append(
            "Random-weight diffusion model: its confidences are near-uniform, so threshold decoding commits about one "
            "token per step and agreement with the baseline says little; pass --checkpoint for meaningful numbers."
        )
    if args.ar_checkpoint:
        ar_model, _ = load_model(args.ar_checkpoint, kind="ar", device=device)
    else:
        torch.manual_seed(1)
        ar_model = Transformer(diffusion_model.config).to(device).eval()
    return diffusion_model, ar_model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    settings = TINY if args.tiny or device.type == "cpu" else BenchSettings()
    settings = replace(
        settings, compile=settings.compile and not args.no_compile, threshold=args.threshold or settings.threshold
    )
    config = preset(settings.preset)
    notes = []
    if device.type == "cpu" or args.tiny:
        notes.append("CPU/tiny smoke test: checks that the benchmark runs; its numbers say nothing about GPU speed.")
    training = {}
    if not args.skip_training:
        for kind in ("ar", "diffusion"):
            print(f"training {kind} ...", flush=True)
            training[kind] = bench_training(kind, config, settings, device)
        training["diffusion_vs_ar"] = training["diffusion"]["tokens_per_s"] / training["ar"]["tokens_per_s"]
    diffusion_model, ar_model = decoding_models(args, settings, config, device, notes)
    print("decoding ...", flush=True)
    decoding = bench_decoding(diffusion_model, ar_model, settings, device)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    report = {
        "device": device_name,
        "device_type": device.type,
        "date": datetime.date.today().isoformat(),
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
        "decoding_model_config": diffusion_model.config.to_dict(),
        "training": training,
        "decoding": decoding,
        "notes": notes,
    }
    write_report(report, args.out)
    return report


def write_report(report: dict, out: str | None) -> None:
    """The JSON (default benchmarks/results/bench_<device>_<date>.json) and its markdown table beside it."""
    name = report["device"].lower().replace("nvidia", "")
    slug = "cpu" if report["device_type"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    path = Path(out or ROOT / "benchmarks" / "results" / f"bench_{slug}_{report['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    path.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    run_main(main)
