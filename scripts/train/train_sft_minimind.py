"""AR SFT: next-token loss on every assistant span (content + <|im_end|>), never on prompt or padding.

uv run python -m scripts.train.train_sft_minimind --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/minimind_pretrain_state_dict.pt --run-name minimind_sft --max-seq-len 512 --batch-size 96 \
    --epochs 2
"""

from __future__ import annotations

import argparse

from model.objectives.ar_loss import next_token_loss
from scripts.common.cli import parse, run_main
from scripts.common.settings import settings_from
from scripts.common.training.flags import TrainingFlags
from scripts.common.training.sft import SFTData, run_sft, sft_parser, start_sft


def parse_args(argv=None) -> argparse.Namespace:
    return parse(sft_parser(__doc__, run_name="minimind_sft", epochs=2), argv)


def settings(argv=None) -> TrainingFlags:
    """The command line, typed."""
    args = parse_args(argv)
    return TrainingFlags.from_args(args, "ar", settings_from(SFTData, args))


def sft_loss(model, batch, rng, step=None):
    """Next-token cross-entropy on the assistant tokens (labels); the same for training and validation."""
    stats = {}
    return next_token_loss(model, batch["input_ids"], batch["labels"], batch.get("scored_at"), stats), stats


def main(argv=None) -> dict:
    flags = settings(argv)
    return run_sft(flags, start_sft(flags), sft_loss)


if __name__ == "__main__":
    run_main(main)
