"""The CPU experiments of technical_report.md, reproducible on a 2-core machine in well under an hour.

uv run python -m scripts.report_experiments [--out-dir weights/report] [--steps 500] [--sft-steps 200]

On the embedded sample, with one small model shape (hidden 128, 4 layers, 4 heads, 2 KV heads):
1. AR pretraining; 2. diffusion initialised from it and 3. diffusion from scratch, at equal steps;
4. AR perplexity vs diffusion NELBO on the same held-out rows, and all validation curves on one figure;
5. SFT of AR and of the AR-initialised diffusion model, sentiment accuracy on held-out reviews (by decoding and by
   label likelihood); the diffusion SFT again for 3x the steps, and as LLaDA 2.0 block SFT (block 32);
6. diffusion decoding quality against speed (steps, threshold) on the same questions, with the 3x-steps model.
Every number in the report comes from the commands this prints (also saved to <out-dir>/commands.txt).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from scripts.common.cli import run_main
from scripts.quickstart import SMALL_MODEL, step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="weights/report")
    p.add_argument("--data-dir", default="dataset")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, data = Path(args.out_dir), Path(args.data_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    results, timings = {}, {}

    def timed(name, *a):
        start = time.perf_counter()
        results[name] = step(*a)
        timings[name] = round(time.perf_counter() - start, 1)
        return results[name]

    device = ["--device", args.device]
    timed("sample", "0. Offline sample", "scripts.data.sample", ["--out-dir", str(data)])
    pretrain = [
        "--data",
        str(data / "sample_pretrain.jsonl"),
        "--tokenizer-dir",
        ".",
        "--save-dir",
        str(out),
        *SMALL_MODEL,
        *device,
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--max-iters",
        str(args.steps),
        "--warmup-steps",
        "25",
        "--learning-rate",
        "2e-3",
        "--eval-interval",
        "50",
        "--eval-batches",
        "8",
        "--log-interval",
        "10",
    ]
    timed("ar", "1. AR pretraining", "scripts.train.train_pretrain", [*pretrain, "--run-name", "ar"])
    diffusion = ["--train", "--use-tokenizer", *pretrain, "--mask-schedule", "iid_t", "--lr-schedule", "cosine"]
    timed(
        "diffusion_from_ar",
        "2. Diffusion initialised from AR",
        "scripts.train.diffusion",
        [*diffusion, "--run-name", "diffusion_from_ar", "--init-from-minimind", str(out / "ar_state_dict.pt")],
    )
    timed(
        "diffusion_scratch",
        "3. Diffusion from scratch",
        "scripts.train.diffusion",
        [*diffusion, "--run-name", "diffusion_scratch"],
    )
    timed(
        "compare",
        "4. AR perplexity vs diffusion NELBO, validation curves",
        "scripts.eval.compare",
        [
            "--out",
            str(out / "compare"),
            "--tokenizer-dir",
            ".",
            "--seq-len",
            "128",
            "--eval-data",
            str(data / "sample_pretrain_val.jsonl"),
            "--eval-max-batches",
            "8",
            "--mc-samples",
            "8",
            "--checkpoint",
            str(out / "ar_state_dict.pt"),
            "--checkpoint",
            str(out / "diffusion_from_ar_state_dict.pt"),
            "--checkpoint",
            str(out / "diffusion_scratch_state_dict.pt"),
            *device,
        ],
    )
    sft = [
        "--data",
        str(data / "sample_sft_train.jsonl"),
        "--eval-data",
        str(data / "sample_sft_val.jsonl"),
        "--tokenizer-dir",
        ".",
        "--save-dir",
        str(out),
        "--max-seq-len",
        "256",
        "--batch-size",
        "16",
        "--max-steps",
        str(args.sft_steps),
        "--learning-rate",
        "1e-3",
        "--warmup-steps",
        "20",
        "--eval-interval",
        "50",
        "--eval-batches",
        "8",
        *device,
    ]
    timed(
        "ar_sft",
        "5a. AR SFT",
        "scripts.train.train_sft_minimind",
        [*sft, "--run-name", "ar_sft", "--load-from", str(out / "ar_state_dict.pt")],
    )
    timed(
        "diffusion_sft",
        "5b. Diffusion SFT",
        "scripts.train.train_sft_diffusion",
        [*sft, "--run-name", "diffusion_sft", "--load-from", str(out / "diffusion_from_ar_state_dict.pt")],
    )
    accuracy = [
        "--data",
        str(data / "sample_sft_test.jsonl"),
        "--tokenizer-dir",
        ".",
        "--limit",
        str(args.questions),
        "--batch-size",
        "1",
        *device,
    ]
    timed(
        "accuracy",
        "5c. Sentiment accuracy, AR vs diffusion",
        "scripts.eval.eval_sft_accuracy",
        [
            *accuracy,
            "--minimind-checkpoint",
            str(out / "ar_sft_state_dict.pt"),
            "--diffusion-checkpoint",
            str(out / "diffusion_sft_state_dict.pt"),
            "--score-labels",
        ],
    )
    longer = [*sft[: sft.index("--max-steps") + 1], str(3 * args.sft_steps), *sft[sft.index("--max-steps") + 2 :]]
    timed(
        "diffusion_sft_3x",
        "5d. Diffusion SFT, 3x the steps",
        "scripts.train.train_sft_diffusion",
        [*longer, "--run-name", "diffusion_sft_3x", "--load-from", str(out / "diffusion_from_ar_state_dict.pt")],
    )
    timed(
        "diffusion_sft_block32",
        "5e. Diffusion SFT as LLaDA 2.0 block SFT (block 32)",
        "scripts.train.train_sft_diffusion",
        [
            *sft,
            "--run-name",
            "diffusion_sft_block32",
            "--block-size",
            "32",
            "--load-from",
            str(out / "diffusion_from_ar_state_dict.pt"),
        ],
    )
    timed(
        "accuracy_3x",
        "5f. Accuracy of the 3x-steps diffusion SFT",
        "scripts.eval.eval_sft_accuracy",
        [*accuracy, "--diffusion-checkpoint", str(out / "diffusion_sft_3x_state_dict.pt"), "--score-labels"],
    )
    timed(
        "accuracy_block32",
        "5g. Accuracy of the block SFT (decoded block-causally)",
        "scripts.eval.eval_sft_accuracy",
        [*accuracy, "--diffusion-checkpoint", str(out / "diffusion_sft_block32_state_dict.pt"), "--score-labels"],
    )
    for label, flags in (
        ("steps4", ["--gen-steps", "4"]),
        ("steps2", ["--gen-steps", "2"]),
        ("threshold0.9", ["--threshold", "0.9"]),
        ("threshold0.7", ["--threshold", "0.7"]),
    ):
        timed(
            f"accuracy_3x_{label}",
            f"6. Diffusion accuracy with {' '.join(flags)}",
            "scripts.eval.eval_sft_accuracy",
            [*accuracy, "--diffusion-checkpoint", str(out / "diffusion_sft_3x_state_dict.pt"), *flags],
        )
    summary = {"timings_s": timings, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {out / 'results.json'}; timings (s): {timings}")
    return summary


if __name__ == "__main__":
    run_main(main)
