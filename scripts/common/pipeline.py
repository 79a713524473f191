"""Running entry points in sequence, as the quickstart and the report's experiments do."""

from __future__ import annotations

import importlib
import shlex
import time
from pathlib import Path

from model.config import preset

# The quickstart's and the CPU experiments' model (the "small" preset, 1.6M parameters), as shape flags.
SMALL_MODEL = {
    name: getattr(preset("small"), name)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
}


def cli(*switches: str, **options) -> list[str]:
    """Command-line arguments from keyword options: cli("--train", seq_len=128) -> ["--train", "--seq-len", "128"].
    Options set to None are left out."""
    argv = list(switches)
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def step(title: str, module: str, argv: list[str]):
    """Run one entry point in this process (imports are paid once), after printing its command line."""
    print(f"\n## {title}\n$ uv run python -m {module} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    result = importlib.import_module(module).main(argv)
    print(f"({time.perf_counter() - start:.0f} s)")
    return result


def quickstart_pretraining(
    out, data, device=None, ar_steps: int = 300, diffusion_steps: int = 30, ar_name="quick_ar", diffusion_name=None
) -> tuple[dict, dict]:
    """The quickstart's pretraining (the SFT protocol's too): AR on the review texts, then diffusion initialised from
    it. Writes <ar_name>_state_dict.pt and <diffusion_name>_best.pt in `out`; returns both runs' summaries."""
    diffusion_name = diffusion_name or ar_name.replace("ar", "diffusion")
    # fmt: off
    common = cli(data=Path(data) / "sample_reviews.jsonl", jsonl_field="text", tokenizer_dir=".", save_dir=out,
                 device=device, **SMALL_MODEL, seq_len=128, batch_size=16, warmup_steps=15,
                 eval_interval=50, eval_batches=4, log_interval=10)
    # fmt: on
    ar = step(
        "1. AR pretraining",
        "scripts.train.train_pretrain",
        [*common, *cli(run_name=ar_name, max_iters=ar_steps, learning_rate="2e-3")],
    )
    # The conversion keeps the AR weights: at the pretraining's 2e-3 its 30 steps end above where they started
    # (technical_report.md 7.7); a small learning rate adapts them to bidirectional attention instead.
    diffusion = step(
        "2. Diffusion pretraining, initialised from the AR model",
        "scripts.train.diffusion",
        cli(
            "--train",
            "--use-tokenizer",
            *common,
            run_name=diffusion_name,
            max_iters=diffusion_steps,
            learning_rate="1e-4",
            mask_schedule="iid_t",
            init_from_minimind=Path(out) / f"{ar_name}_state_dict.pt",
        ),
    )
    return ar, diffusion
