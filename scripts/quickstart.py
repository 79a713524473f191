"""The whole pipeline, offline, on the embedded sample with a small model: a few minutes on a 2-core CPU.

uv run python -m scripts.quickstart

Builds the sample corpora (dataset/sample_*.jsonl), then runs, each through its real entry point:
AR pretraining -> diffusion pretraining initialised from it -> a sample from each -> AR SFT and diffusion
SFT on the sentiment questions -> the side-by-side answer to one prompt -> both accuracies.
Every step prints the command it runs, so you can rerun or scale any of them by hand.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import time
from pathlib import Path

from scripts.common.cli import run_main

SMALL_MODEL = [
    "--hidden-size",
    "128",
    "--num-hidden-layers",
    "4",
    "--num-attention-heads",
    "4",
    "--num-key-value-heads",
    "2",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out-dir", default="weights/quickstart", help="where the quickstart's checkpoints go (cleared first)"
    )
    p.add_argument("--data-dir", default="dataset")
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--sft-steps", type=int, default=80)
    p.add_argument("--accuracy-questions", type=int, default=100)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def step(title: str, module: str, argv: list[str]):
    """Run one entry point in this process (imports are paid once), after printing its command line."""
    import importlib

    print(f"\n## {title}\n$ uv run python -m {module} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    result = importlib.import_module(module).main(argv)
    print(f"({time.perf_counter() - start:.0f} s)")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, data = Path(args.out_dir), Path(args.data_dir)
    if out.exists():
        shutil.rmtree(out)
    device = ["--device", args.device] if args.device else []
    common = ["--tokenizer-dir", ".", "--save-dir", str(out), *device]
    started = time.perf_counter()

    step("0. Build the offline sample", "scripts.data.sample", ["--out-dir", str(data)])
    pretrain = [
        "--data",
        str(data / "sample_pretrain.jsonl"),
        "--jsonl-field",
        "text",
        *common,
        *SMALL_MODEL,
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--max-iters",
        str(args.pretrain_steps),
        "--warmup-steps",
        "15",
        "--eval-interval",
        "50",
        "--eval-batches",
        "4",
        "--log-interval",
        "10",
    ]
    ar = step(
        "1. AR pretraining",
        "scripts.train.train_pretrain",
        [*pretrain, "--run-name", "quick_ar", "--learning-rate", "2e-3"],
    )
    diffusion = step(
        "2. Diffusion pretraining, initialised from the AR model",
        "scripts.train.diffusion",
        [
            "--train",
            "--use-tokenizer",
            *pretrain,
            "--run-name",
            "quick_diffusion",
            "--learning-rate",
            "2e-3",
            "--mask-schedule",
            "iid_t",
            "--init-from-minimind",
            str(out / "quick_ar_state_dict.pt"),
        ],
    )
    step(
        "3a. AR sample",
        "scripts.eval.eval_minimind",
        [
            "--checkpoint",
            str(out / "quick_ar_state_dict.pt"),
            "--tokenizer-dir",
            ".",
            "--prompt",
            "中国经济",
            "--max-new-tokens",
            "40",
            "--temperature",
            "0",
            "--eval-data",
            str(data / "sample_pretrain_val.jsonl"),
            "--seq-len",
            "128",
            "--eval-max-batches",
            "8",
            *device,
        ],
    )
    step(
        "3b. Diffusion sample",
        "scripts.eval.eval_diffusion",
        [
            "--checkpoint",
            str(out / "quick_diffusion_best.pt"),
            "--tokenizer-dir",
            ".",
            "--seq-len",
            "128",
            "--prompt",
            "中国经济",
            "--max-new-tokens",
            "40",
            "--block-length",
            "8",
            "--eval-data",
            str(data / "sample_pretrain_val.jsonl"),
            "--eval-max-batches",
            "8",
            *device,
        ],
    )
    sft = [
        "--data",
        str(data / "sample_sft_train.jsonl"),
        "--eval-data",
        str(data / "sample_sft_val.jsonl"),
        *common,
        "--max-seq-len",
        "256",
        "--batch-size",
        "16",
        "--max-steps",
        str(args.sft_steps),
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        "10",
        "--eval-interval",
        "40",
        "--eval-batches",
        "4",
    ]
    step(
        "4a. AR SFT",
        "scripts.train.train_sft_minimind",
        [*sft, "--run-name", "quick_ar_sft", "--load-from", str(out / "quick_ar_state_dict.pt")],
    )
    step(
        "4b. Diffusion SFT",
        "scripts.train.train_sft_diffusion",
        [*sft, "--run-name", "quick_diffusion_sft", "--load-from", str(out / "quick_diffusion_best.pt")],
    )
    checkpoints = [
        "--minimind-checkpoint",
        str(out / "quick_ar_sft_state_dict.pt"),
        "--diffusion-checkpoint",
        str(out / "quick_diffusion_sft_state_dict.pt"),
    ]
    step(
        "5. One prompt, side by side",
        "scripts.eval.eval_sft_one_prompt",
        [
            "--prompt",
            "下面这条商品评论的情感是正面还是负面？请只回答“正面”或“负面”。\n评论：质量很好，物流也快，非常满意！",
            "--tokenizer-dir",
            ".",
            *checkpoints,
            "--seq-len",
            "256",
            "--max-new-tokens",
            "8",
            *device,
        ],
    )
    accuracy = step(
        "6. Sentiment accuracy on held-out reviews",
        "scripts.eval.eval_sft_accuracy",
        [
            "--data",
            str(data / "sample_sft_test.jsonl"),
            "--tokenizer-dir",
            ".",
            *checkpoints,
            "--limit",
            str(args.accuracy_questions),
            *device,
        ],
    )
    print(
        f"\nquickstart done in {time.perf_counter() - started:.0f} s: AR val loss {ar['best_val']:.3f}, "
        f"diffusion val loss (NELBO bound) {diffusion['best_val']:.3f}, accuracy AR {accuracy['AR']['accuracy']:.2f} / "
        f"diffusion {accuracy['Diffusion']['accuracy']:.2f}; files in {out}/"
    )
    return {"ar": ar, "diffusion": diffusion, "accuracy": accuracy}


if __name__ == "__main__":
    run_main(main)
