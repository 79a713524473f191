"""The whole pipeline, offline, on the embedded sample with a small model: a few minutes on a 2-core CPU.

uv run python -m scripts.quickstart

Builds the sample corpora (dataset/sample_*.jsonl), then runs, each through its real entry point:
AR pretraining -> diffusion pretraining initialised from it -> a sample from each -> AR SFT and diffusion
SFT on the sentiment questions -> the side-by-side answer to one prompt -> both accuracies.
Every step prints the command it runs, so you can rerun or scale any of them by hand.

The pretraining reads the review texts alone (dataset/sample_reviews.jsonl: the SFT train split, unlabelled):
in the minutes it has, a model pretrained on the mixed news-and-reviews corpus learns too little of the reviews'
vocabulary for its SFT to get past the label prior (technical_report.md 7.6).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from scripts.common.cli import Bounded, run_main
from scripts.common.pipeline import cli, quickstart_pretraining, step

PROMPT = "下面这条商品评论的情感是正面还是负面？请只回答“正面”或“负面”。\n评论：质量很好，物流也快，非常满意！"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="weights/quickstart", help="where its checkpoints go (cleared first)")
    p.add_argument("--data-dir", default="dataset")
    count = dict(type=int, action=Bounded, low=1)
    p.add_argument("--pretrain-steps", **count, default=300, help="AR pretraining steps")
    p.add_argument("--diffusion-steps", **count, default=30, help="diffusion pretraining steps, from the AR model")
    p.add_argument("--sft-steps", **count, default=150)
    scored = "held-out reviews scored (200: a standard error near 0.03)"
    p.add_argument("--accuracy-questions", **count, default=200, help=scored)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def samples(args, out: Path, data: Path) -> None:
    """A greedy continuation and the held-out loss of each pretrained model."""
    common = cli(tokenizer_dir=".", prompt="这款手机", max_new_tokens=40, seq_len=128, device=args.device)
    common += cli(eval_data=data / "sample_reviews_val.jsonl", eval_max_batches=4)
    ar, diffusion = out / "quick_ar_state_dict.pt", out / "quick_diffusion_best.pt"
    step("3a. AR sample", "scripts.eval.eval_minimind", cli(*common, checkpoint=ar, temperature=0))
    step("3b. Diffusion sample", "scripts.eval.eval_diffusion", cli(*common, checkpoint=diffusion, block_length=8))


def finetune(args, out: Path, data: Path) -> None:
    """AR SFT and diffusion SFT on the review-sentiment questions, each from its pretrained model."""
    # fmt: off
    common = cli(data=data / "sample_sft_train.jsonl", eval_data=data / "sample_sft_val.jsonl",
                 tokenizer_dir=".", save_dir=out, device=args.device, max_seq_len=256, batch_size=16,
                 max_steps=args.sft_steps, learning_rate="1e-3", warmup_steps=10, eval_interval=40, eval_batches=4)
    # fmt: on
    ar = cli(*common, run_name="quick_ar_sft", load_from=out / "quick_ar_state_dict.pt")
    step("4a. AR SFT", "scripts.train.train_sft_minimind", ar)
    # The answer is one decision, taken from an all-masked 8-token canvas (three answer tokens and five EOS) when
    # decoding starts: each answer is padded with 5 EOS, so the SFT trains on that canvas. The objective is the
    # trainer's default (the prompt read causally, the first answer token's exact term; technical_report.md 7.9).
    recipe = cli(eos_padding_length=5)
    diffusion = cli(*common, *recipe, run_name="quick_diffusion_sft", load_from=out / "quick_diffusion_best.pt")
    step("4b. Diffusion SFT", "scripts.train.train_sft_diffusion", diffusion)


def compare(args, out: Path, data: Path) -> dict:
    """Both SFT models on one prompt side by side, then their accuracy on held-out reviews."""
    checkpoints = cli(
        minimind_checkpoint=out / "quick_ar_sft_state_dict.pt",
        diffusion_checkpoint=out / "quick_diffusion_sft_state_dict.pt",
    )
    common = cli(*checkpoints, tokenizer_dir=".", device=args.device)
    one_prompt = cli(*common, prompt=PROMPT, seq_len=256, max_new_tokens=8)
    step("5. One prompt, side by side", "scripts.eval.eval_sft_one_prompt", one_prompt)
    accuracy = cli(*common, data=data / "sample_sft_test.jsonl", limit=args.accuracy_questions)
    return step("6. Sentiment accuracy on held-out reviews", "scripts.eval.eval_sft_accuracy", accuracy)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out, data = Path(args.out_dir), Path(args.data_dir)
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    step("0. Build the offline sample", "scripts.data.sample", cli(out_dir=data))
    ar, diffusion = quickstart_pretraining(out, data, args.device, args.pretrain_steps, args.diffusion_steps)
    samples(args, out, data)
    finetune(args, out, data)
    accuracy = compare(args, out, data)
    print(
        f"\nquickstart done in {time.perf_counter() - started:.0f} s: AR val loss {ar['best_val']:.3f}, "
        f"diffusion val loss (NELBO bound) {diffusion['best_val']:.3f}, accuracy AR {accuracy['AR']['accuracy']:.2f} / "
        f"diffusion {accuracy['Diffusion']['accuracy']:.2f}; files in {out}/"
    )
    return {"ar": ar, "diffusion": diffusion, "accuracy": accuracy}


if __name__ == "__main__":
    run_main(main)
