"""What a benchmark run records besides its timings: the device's bf16 peak (for MFU), the code version, and the
markdown table printed and saved beside the JSON (scripts/bench.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]

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


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def git_commit() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    # Earlier results in benchmarks/results do not make the code dirty.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(dirty)}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _training_lines(report: dict) -> list[str]:
    settings, t = report["settings"], report["training"]
    if not t:
        return [""]
    dtype = settings["dtype"] if report["device_type"] == "cuda" else "float32"
    lines = [
        f"## Training (seq {settings['seq_len']}, batch {settings['train_batch']}, {dtype}, "
        f"compile {report['compiled']})",
        "",
        "| route | tokens/s | step ms | TFLOP/s | MFU | peak memory GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for route in ("ar", "diffusion"):
        r = t[route]
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        lines.append(
            f"| {route} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_seconds']:.1f} | {r['achieved_tflops']:.2f} | "
            f"{_percent(r['mfu'])} | {memory} |"
        )
    return lines + ["", f"diffusion / AR tokens/s: {t['diffusion_vs_ar']:.3f}", ""]


def _decoding_lines(report: dict) -> list[str]:
    settings = report["settings"]
    lines = [
        f"## Decoding (prompt {settings['prompt_len']}, block {settings['block_size']}, "
        f"threshold {settings['threshold']}, greedy)",
        "",
        "| new tokens | batch | mode | tokens/s | NFE | tokens/forward | vs baseline | vs AR | agreement |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["decoding"]:
        lines.append(
            f"| {r['gen_length']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:,.1f} | {r['nfe']} | "
            f"{r['tokens_per_forward']:.2f} | {r['speedup_vs_baseline']:.2f}x | {r['speed_vs_ar']:.2f}x | "
            f"{_percent(r['agreement_with_baseline'])} |"
        )
    return lines


def markdown(report: dict) -> str:
    """The report as markdown: a header line, the training table, the decoding table, the notes."""
    lines = [f"# nano-llada benchmark: {report['device']} ({report['date']})", ""]
    if report["smoke_test"]:
        lines += ["**Smoke test: tiny config, not a measurement of the default model.**", ""]
    git = report["git"]
    decoding_parameters = ModelConfig.from_dict(report["decoding_model_config"]).num_parameters()
    lines += [
        f"torch {report['torch']}, commit {str(git['commit'])[:10]}{' (dirty)' if git['dirty'] else ''}, "
        f"model preset `{report['settings']['preset']}` ({report['model_parameters'] / 1e6:.1f}M parameters), "
        f"decoding with diffusion weights: {report['diffusion_weights']} ({decoding_parameters / 1e6:.1f}M parameters)",
        "",
    ]
    lines += _training_lines(report) + _decoding_lines(report)
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
