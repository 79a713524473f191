"""What a benchmark run records besides its timings: the device's bf16 peak (for MFU), the code version, and the
markdown card printed and saved beside the JSON, and its plot of quality against speed (scripts/bench.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]

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


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _training_lines(report: dict) -> list[str]:
    settings, t = report["training_settings"], report["training"]
    if not t:
        return []
    dtype = settings["dtype"] if report["device_type"] == "cuda" else "float32"
    lines = [
        f"## Training ({report['training_model_parameters'] / 1e6:.1f}M parameters, seq {settings['seq_len']}, "
        f"batch {settings['train_batch']}, {dtype}, compile {report['compiled']})",
        "",
        "| route | tokens/s | step ms | TFLOP/s | MFU | peak memory GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for route in ("ar", "diffusion"):
        r = t[route]
        lines.append(
            f"| {route} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_seconds']:.1f} | {r['achieved_tflops']:.2f} | "
            f"{_percent(r['mfu'])} | {_num(r['peak_memory_gib'], '.2f')} |"
        )
    return lines + ["", f"diffusion / AR tokens/s: {t['diffusion_vs_ar']:.3f}", ""]


def _goal_lines(goal: dict | None) -> list[str]:
    if not goal:
        return []
    within = f"within {100 * goal['tolerance']:.0f} % of the LLaDA baseline's generative perplexity"
    if goal["best_mode"] is None:
        best = f"no diffusion mode stayed {within}"
    else:
        best = (
            f"the fastest mode {within} is `{goal['best_mode']}` at **{goal['best_speed_vs_ar']:.2f}x AR** "
            f"(perplexity {goal['best_perplexity_vs_baseline']:.3f}x the baseline's)"
        )
    return [
        f"## Goal: diffusion >= AR in content tokens/s, batch 1, {goal['gen_length']}-token continuations",
        "",
        f"**{'Met' if goal['met'] else 'Not met'}**: {best}. Fastest diffusion mode at any quality: "
        f"`{goal['fastest_mode']}` at {goal['fastest_speed_vs_ar']:.2f}x AR (perplexity "
        f"{_num(goal['fastest_perplexity_vs_baseline'], '.3f')}x the baseline's).",
        "",
    ]


CLOCKS = {
    "cpu_time": "the process's CPU time (the CPU is shared: the wall clock would count other jobs' work too)",
    "wall": "the wall clock (synchronised)",
}

CARD_HEADER = [
    "| batch | mode | vs AR | content tokens/s | content length | first token ms | forwards | tokens/forward | "
    "gen. perplexity | vs baseline | unigram entropy | accuracy |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def _card_lines(card: dict) -> list[str]:
    lines, seen = [], None
    for r in card["rows"]:
        if (r["workload"], r["gen_length"]) != seen:
            seen = (r["workload"], r["gen_length"])
            lines += ["", f"### {r['workload']}, up to {r['gen_length']} new tokens, {r['prompts']} prompts", ""]
            lines += CARD_HEADER
        lines.append(
            f"| {r['batch']} | {r['mode']} | {_num(r['speed_vs_ar'], '.2f')}x | {r['content_tokens_per_s']:,.1f} | "
            f"{r['mean_content_length']:.1f} | {1e3 * r['first_token_seconds']:.1f} | {r['forward_passes']:.1f} | "
            f"{r['tokens_per_forward']:.2f} | {_num(r['generative_perplexity'], '.1f')} | "
            f"{_num(r['perplexity_vs_baseline'], '.3f')} | {_num(r['unigram_entropy'], '.2f')} | "
            f"{_percent(r['accuracy'])} |"
        )
    return lines + [""]


def markdown(report: dict) -> str:
    """The report as markdown: what ran where, the goal (ratio first), one table per workload, training, notes."""
    lines = [f"# nano-llada speed card: {report['device']} ({report['date']})", ""]
    if report["smoke_test"]:
        lines += ["**Smoke run: random tiny models. It checks that the code runs; never quote it as a speed.**", ""]
    git, card = report["git"], report["card"]
    lines += [
        f"torch {report['torch']}, commit {str(git['commit'])[:10]}{' (dirty)' if git['dirty'] else ''}, "
        f"{report['threads']} torch threads, timed by {CLOCKS[report['clock']]}. Read the ratios (vs AR: measured "
        "in the same run, AR timed before and after the other modes) and the forward counts, not the absolute times.",
        "",
    ]
    if card:
        for key, names in card["models"].items():
            lines.append(f"- {key} pair: AR `{names['ar']}`, diffusion `{names['diffusion']}`")
        goal = [] if report["smoke_test"] else _goal_lines(card["goal"])  # a smoke run has no verdict to quote
        lines += [""] + goal + ["## The card"] + _card_lines(card)
    lines += _training_lines(report)
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def plot_card(report: dict, png: Path) -> Path | None:
    """Quality against content tokens/s, one panel per workload (perplexity for continuations, accuracy for the
    classification answers), batch sizes as markers; None without matplotlib (a bare GPU machine) or a card."""
    card = report["card"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not card:
        return None

    def quality_of(workload: str) -> str:
        return "accuracy" if workload == "classification" else "generative_perplexity"

    # One panel per workload with a quality to plot, in the card's order (a smoke run's answers have no labels).
    scored = [r for r in card["rows"] if r[quality_of(r["workload"])] is not None]
    panels = list(dict.fromkeys((r["workload"], r["gen_length"]) for r in scored))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (workload, length) in zip(axes[0], panels):
        quality = quality_of(workload)
        for batch, marker in zip(sorted({r["batch"] for r in card["rows"]}), "os^D"):
            rows = [
                r for r in card["rows"] if (r["workload"], r["gen_length"], r["batch"]) == (workload, length, batch)
            ]
            rows = [r for r in rows if r[quality] is not None]
            ax.scatter([r["content_tokens_per_s"] for r in rows], [r[quality] for r in rows], marker=marker,
                       label=f"batch {batch}")  # fmt: skip
            for r in rows:
                ax.annotate(r["mode"].replace("threshold_", "t"), (r["content_tokens_per_s"], r[quality]), fontsize=6)
        ax.set(xscale="log", xlabel="content tokens/s", ylabel=quality.replace("_", " "), title=f"{workload} {length}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}, {report['date']}" + (" (smoke run)" if report["smoke_test"] else ""))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
