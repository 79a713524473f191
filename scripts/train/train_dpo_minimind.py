"""AR DPO: exact log-likelihoods of the chosen and rejected answers, the frozen reference = the starting checkpoint.

uv run python -m scripts.train.train_dpo_minimind --data dataset/dpo.jsonl --tokenizer-dir . \
    --load-from weights/minimind_sft_state_dict.pt --run-name minimind_dpo --max-seq-len 512 --batch-size 8
"""

from __future__ import annotations

import argparse

from model.objectives.preference import DPOObjective, ar_scorer
from scripts.common.cli import parse, run_main
from scripts.common.training.dpo import dpo_parser, dpo_settings, run_dpo


def parse_args(argv=None) -> argparse.Namespace:
    return parse(dpo_parser(__doc__, run_name="minimind_dpo"), argv)


def main(argv=None) -> dict:
    flags = dpo_settings(parse_args(argv), "ar")

    def objective(reference, checkpoint, tokenizer):
        return DPOObjective(reference, ar_scorer(), flags.own.terms())

    return run_dpo(flags, objective, extra_meta=lambda checkpoint: {})


if __name__ == "__main__":
    run_main(main)
