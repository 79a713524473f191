"""AR SFT: next-token loss on every assistant span (content + <|im_end|>), never on prompt or padding.

uv run python -m scripts.train.train_sft_minimind --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/minimind_pretrain_state_dict.pt --run-name minimind_sft --max-seq-len 512 --batch-size 96 --epochs 2
"""

from __future__ import annotations

import argparse

from model.ar import next_token_loss
from scripts.common.cli import run_main
from scripts.common.sft import add_sft_flags, run_sft


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_flags(p, run_name="minimind_sft", epochs=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_sft(
        args, "ar", lambda model, batch, rng, tokenizer: next_token_loss(model, batch["input_ids"], batch["labels"])
    )


if __name__ == "__main__":
    run_main(main)
