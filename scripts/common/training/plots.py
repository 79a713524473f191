"""Loss curves from a run's metrics jsonl: train loss (raw and smoothed) per step, validation per eval."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

from model.errors import NanoLladaError

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for lineno, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # cut short by a killed run (kill -9 mid-write): the records before it stand
                break
            raise NanoLladaError(f"{path}:{lineno}: not a JSON metrics record; fix or delete the line") from None
    return records


def ema(values: list[float], alpha: float) -> list[float]:
    out, current = [], None
    for v in values:
        current = v if current is None else alpha * v + (1 - alpha) * current
        out.append(current)
    return out


def plot_loss(metrics_path: str | Path, png_path: str | Path, title: str) -> None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(
            steps,
            ema(list(losses), alpha=min(1.0, 20 / max(len(losses), 1))),
            color="tab:blue",
            linewidth=1.8,
            label="train (smoothed)",
        )
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.8, markersize=4, label="validation")
    ax.set(title=title, xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, Path(png_path))


def save_figure(fig, path: Path) -> None:
    """Write the PNG atomically (temp file + os.replace), so a killed run never leaves half an image."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
