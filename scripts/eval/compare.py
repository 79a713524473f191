"""Compare several checkpoints (AR and diffusion): one markdown table, validation curves on one figure.

uv run python -m scripts.eval.compare --out reports/compare --tokenizer-dir . \
    --checkpoint weights/pretrain_ar.pt --checkpoint weights/diffusion_from_ar.pt \
    --checkpoint weights/diffusion_scratch.pt [--eval-data dataset/sample_pretrain_val.jsonl] \
    [--data ceval/val --limit 50]

For each checkpoint: held-out LM numbers on the same rows (scripts.eval.eval_lm: AR NLL vs diffusion NELBO,
s.e. across rows, Δ vs the first checkpoint with a paired s.e.), optionally multiple-choice accuracy on --data
(scripts.eval.eval_multiple_choice; C-Eval/CMMLU csv from ModelScope), and the run's validation curve from
`<dir>/<run>_metrics.jsonl` next to the checkpoint (run = file name without .pt, _best, _state_dict).
Writes to --out: comparison.md (tables + figures), comparison.json (all numbers), validation_curves.png,
lm_nll.png. Validation losses are nats/token for both routes: AR next-token loss, diffusion NELBO (a bound).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt

from scripts.common.cli import parse, pick_device, run_main
from scripts.common.evaluation.lm_scores import LMScoring, add_lm_flags, add_paired_deltas, lm_results, lm_table
from scripts.common.evaluation.multiple_choice import (
    ScoringSettings,
    add_choice_flags,
    evaluate_question_sets,
    load_question_sets,
)
from scripts.common.settings import settings_from
from scripts.common.training.plots import read_metrics, save_figure  # also selects the Agg backend


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lm_flags(p)
    choice = p.add_argument_group("multiple choice (optional: only with --data)")
    # the LM numbers' --seed seeds the choice scoring too
    add_choice_flags(choice, data_required=False, prefix="choice_", skip=("seed",))
    p.add_argument("--out", required=True, help="output directory")
    return parse(p, argv)


def run_name(checkpoint: str | Path) -> str:
    name = Path(checkpoint).name.removesuffix(".pt").removesuffix(".pth")
    for suffix in ("_state_dict", "_best"):
        name = name.removesuffix(suffix)
    return name


def metrics_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_name(f"{run_name(checkpoint)}_metrics.jsonl")


def plot_validation_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    for label, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, "o-", linewidth=1.6, markersize=3, label=label)
    ax.set(title="validation loss", xlabel="optimizer step", ylabel="nats/token (AR: NLL, diffusion: NELBO)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_lm_numbers(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5), dpi=120)
    labels = [f"{run_name(r['checkpoint'])}\n({r['kind']})" for r in results]
    colors = ["tab:blue" if r["kind"] == "ar" else "tab:orange" for r in results]
    means, errors = [r["nll_per_token"] for r in results], [r["stderr"] for r in results]
    ax.bar(range(len(results)), means, yerr=errors, color=colors, capsize=4)
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set(
        title="held-out nats/token on the same rows, ±1 s.e.\nblue: AR NLL (exact), orange: diffusion NELBO (bound)",
        ylabel="nats/token",
    )
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def comparison_markdown(args, results: list[dict], settings: ScoringSettings | None, curves: dict) -> str:
    """comparison.md: the LM table, the multiple-choice table (with --data) and the validation curves."""
    lines = [
        "# Checkpoint comparison",
        "",
        f"Held-out rows: the first {results[0]['rows']} rows of {args.seq_len} tokens of `{args.eval_data}`, each "
        f"scored on tokens 1..{args.seq_len - 1} given token 0. AR: exact NLL; diffusion: NELBO (upper bound), "
        f"{args.mc_samples} mask draws per row, seed {args.seed}. s.e. across rows (diffusion: rows and masks); "
        "MC s.e.: mask noise only.",
        "",
        lm_table(results),
        "",
        "![held-out nats/token](lm_nll.png)",
        "",
    ]
    if settings is not None:
        lines += [
            f"## Multiple choice ({', '.join(map(str, args.data))}; scored the {settings.continuation})",
            "",
            "| checkpoint | kind | questions | accuracy | s.e. |",
            "|---|---|---:|---:|---:|",
        ]
        for r in results:
            choice = r["choice"]
            lines.append(
                f"| {r['checkpoint']} | {r['kind']} | {choice['items']} | {choice['accuracy']:.4f} | "
                f"{choice['stderr']:.4f} |"
            )
        lines.append("")
    lines += ["## Validation curves", ""]
    if curves:
        lines += [
            "![validation curves](validation_curves.png)",
            "",
            "| run | metrics file | last val loss |",
            "|---|---|---:|",
        ]
        lines += [f"| {r['run']} | `{r['metrics']}` | {r['final_val_loss']:.4f} |" for r in results if r["metrics"]]
    missing = [str(metrics_path(r["checkpoint"])) for r in results if not r["metrics"]]
    if missing:
        lines += ["", "No validation records in: " + ", ".join(f"`{m}`" for m in missing)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    scoring = settings_from(LMScoring, args)
    settings: ScoringSettings | None = None
    if args.data:
        settings = settings_from(ScoringSettings, args, "choice_", seed=args.seed)
        question_sets = load_question_sets(args.data, args.limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    results, curves = [], {}
    for result, model, tokenizer in lm_results(
        args.checkpoint, args.tokenizer_dir, args.num_attention_heads, scoring, device
    ):
        path, kind = result["checkpoint"], result["kind"]
        result["run"] = run_name(path)
        if settings is not None:
            summaries, _ = evaluate_question_sets(
                model, kind, tokenizer, question_sets, settings, device, args.dtype, result["block_size"]
            )
            result["choice"] = summaries["all"]
        del model
        validation = [(r["step"], r["val_loss"]) for r in read_metrics(metrics_path(path)) if "val_loss" in r]
        result["metrics"] = str(metrics_path(path)) if validation else None
        if validation:
            curves[f"{result['run']} ({kind})"] = validation
            result["first_val_loss"], result["final_val_loss"] = validation[0][1], validation[-1][1]
        results.append(result)
        print(
            f"{path}: {kind}, {result['nll_per_token']:.4f} ± {result['stderr']:.4f} nats/token"
            + (f", accuracy {result['choice']['accuracy']:.4f}" if settings else "")
        )
    add_paired_deltas(results)
    (out / "comparison.md").write_text(comparison_markdown(args, results, settings, curves), encoding="utf-8")
    (out / "comparison.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    plot_lm_numbers(results, out / "lm_nll.png")
    if curves:
        plot_validation_curves(curves, out / "validation_curves.png")
    print(lm_table(results))
    print(f"wrote {out / 'comparison.md'}")
    return {"results": results, "out": str(out)}


if __name__ == "__main__":
    run_main(main)
