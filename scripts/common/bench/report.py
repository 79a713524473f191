"""What a benchmark run records besides its timings (the machine, the code version, the device's bf16 peak for MFU)
and how it is written: the JSON, the markdown card beside it (also printed) and its plot of quality against speed."""

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets; matched in this order
# against torch.cuda.get_device_name(). An unknown device gets MFU null rather than a guess.
BF16_PEAK_FLOPS = [("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
                   ("rtx 4090", 165e12), ("rtx 3090", 71e12)]  # fmt: skip
CLOCKS = {
    "cpu_time": "the process's CPU time (the CPU is shared: the wall clock would count other jobs' work too)",
    "wall": "the wall clock (synchronised)",
}
# Markdown columns: (header, JSON key, format spec, scale); a figure that is null prints as "-".
CARD_COLUMNS = [
    ("batch", "batch", "", 1), ("mode", "mode", "", 1), ("x AR", "speed_vs_ar", ".2f", 1),
    ("content tokens/s", "content_tokens_per_s", ",.1f", 1), ("content length", "mean_content_length", ".1f", 1),
    ("first token ms", "first_token_seconds", ".1f", 1e3), ("forwards", "forward_passes", ".1f", 1),
    ("tokens/forward", "tokens_per_forward", ".2f", 1), ("gen. perplexity", "generative_perplexity", ".1f", 1),
    ("x baseline", "perplexity_vs_baseline", ".3f", 1), ("unigram entropy", "unigram_entropy", ".2f", 1),
    ("accuracy", "accuracy", ".1%", 1),
]  # fmt: skip
TRAINING_COLUMNS = [
    ("route", "route", "", 1), ("tokens/s", "tokens_per_s", ",.0f", 1), ("step ms", "step_seconds", ".1f", 1e3),
    ("TFLOP/s", "achieved_tflops", ".2f", 1), ("MFU", "mfu", ".1%", 1), ("peak GiB", "peak_memory_gib", ".2f", 1),
]  # fmt: skip


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in name), None)


def machine_record(device: torch.device, smoke: bool) -> dict:
    """The device, the versions and the git commit (earlier results in benchmarks/results do not make it dirty)."""

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_type": device.type, "date": datetime.date.today().isoformat(), "smoke_test": smoke,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "git": {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(dirty)}, "threads": torch.get_num_threads(),
        "clock": "wall" if cuda else "cpu_time",  # card.timed_run
    }  # fmt: skip


def table(rows: list[dict], columns: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = ["-" if r[key] is None else format(r[key] * scale, spec) for _, key, spec, scale in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def goal_lines(goal: dict) -> list[str]:
    within = f"within {100 * goal['tolerance']:.0f} % of the LLaDA baseline's generative perplexity"
    best = f"no diffusion mode stayed {within}"
    if goal["best_mode"] is not None:
        best = (f"the fastest mode {within} is `{goal['best_mode']}` at **{goal['best_speed_vs_ar']:.2f}x AR** "
                f"(perplexity {goal['best_perplexity_vs_baseline']:.3f}x the baseline's)")  # fmt: skip
    fastest = goal["fastest_perplexity_vs_baseline"]
    return [
        f"## Goal: diffusion >= AR in content tokens/s, batch 1, {goal['gen_length']}-token continuations", "",
        f"**{'Met' if goal['met'] else 'Not met'}**: {best}. Fastest diffusion mode at any quality: "
        f"`{goal['fastest_mode']}` at {goal['fastest_speed_vs_ar']:.2f}x AR (perplexity "
        f"{'-' if fastest is None else format(fastest, '.3f')}x the baseline's).", "",
    ]  # fmt: skip


def markdown(report: dict) -> str:
    """The report as markdown: what ran where, the goal (ratio first), one table per workload, training, notes."""
    lines = [f"# nano-llada speed card: {report['device']} ({report['date']})", ""]
    if report["smoke_test"]:
        lines += ["**Smoke run: random tiny models. It checks that the code runs; never quote it as a speed.**", ""]
    git, card, training, settings = report["git"], report["card"], report["training"], report["training_settings"]
    lines += [
        f"torch {report['torch']}, commit {str(git['commit'])[:10]}{' (dirty)' if git['dirty'] else ''}, "
        f"{report['threads']} torch threads, timed by {CLOCKS[report['clock']]}. Read the ratios (x AR: measured "
        "in the same run, AR timed before and after the other modes) and the forward counts, not the absolute times.",
        "",
    ]
    if card:
        lines += [f"- {key} pair: AR `{names['ar']}`, diffusion `{names['diffusion']}`" for key, names in
                  card["models"].items()] + [""]  # fmt: skip
        if card["goal"] and not report["smoke_test"]:  # a smoke run has no verdict to quote
            lines += goal_lines(card["goal"])
        lines.append("## The card")
        for workload, length in dict.fromkeys((r["workload"], r["gen_length"]) for r in card["rows"]):
            rows = [r for r in card["rows"] if (r["workload"], r["gen_length"]) == (workload, length)]
            lines += ["", f"### {workload}, up to {length} new tokens, {rows[0]['prompts']} prompts", ""]
            lines += table(rows, CARD_COLUMNS)
        lines.append("")
    if training:
        dtype = settings["dtype"] if report["device_type"] == "cuda" else "float32"
        lines += [
            f"## Training ({report['training_model_parameters'] / 1e6:.1f}M parameters, seq "
            f"{settings['seq_len']}, batch {settings['train_batch']}, {dtype}, compile {report['compiled']})",
            "",
        ]
        lines += table([{"route": k, **training[k]} for k in ("ar", "diffusion")], TRAINING_COLUMNS)
        lines += ["", f"diffusion / AR tokens/s: {training['diffusion_vs_ar']:.3f}", ""]
    return "\n".join(lines + [f"- {note}" for note in report["notes"]]) + "\n"


def plot_card(report: dict, png: Path) -> Path | None:
    """Quality against content tokens/s, one panel per workload with a quality to plot (perplexity for continuations,
    accuracy for the classification answers), batch sizes as markers; None without matplotlib or a card."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a bare GPU machine
        return None
    quality = {"continuation": "generative_perplexity", "classification": "accuracy"}
    scored = [r for r in (report["card"] or {}).get("rows", []) if r[quality[r["workload"]]] is not None]
    panels = list(dict.fromkeys((r["workload"], r["gen_length"]) for r in scored))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (workload, length) in zip(axes[0], panels):
        y = quality[workload]
        for batch, marker in zip(sorted({r["batch"] for r in scored}), "os^D"):
            rows = [r for r in scored if (r["workload"], r["gen_length"], r["batch"]) == (workload, length, batch)]
            ax.scatter([r["content_tokens_per_s"] for r in rows], [r[y] for r in rows], marker=marker,
                       label=f"batch {batch}")  # fmt: skip
            for r in rows:
                ax.annotate(r["mode"].replace("threshold_", "t"), (r["content_tokens_per_s"], r[y]), fontsize=6)
        ax.set(xscale="log", xlabel="content tokens/s", ylabel=y.replace("_", " "), title=f"{workload} {length}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']}, {report['date']}" + (" (smoke run)" if report["smoke_test"] else ""))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(report: dict, out: str | None) -> None:
    """The JSON, its markdown card beside it (.md, also printed) and the quality-against-speed plot (.png)."""
    name = report["device"].lower().replace("nvidia", "")
    slug = "cpu" if report["device_type"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    kind = "smoke" if report["smoke_test"] else "speed_card"
    path = Path(out or ROOT / "benchmarks" / "results" / f"{kind}_{slug}_{report['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = markdown(report)
    path.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    plotted = plot_card(report, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f" and {plotted}" if plotted else ""))
