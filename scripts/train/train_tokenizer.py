"""Train a byte-level BPE tokenizer with MiniMind2's layout (ChatML specials at ids 0/1/2, 6400 tokens).

    uv run python -m scripts.train.train_tokenizer [--data FILE.jsonl|.txt] [--jsonl-field text]
        [--vocab-size 6400] [--max-docs N] [--out-dir .]

Without --data it trains on the offline sample corpus (scripts/common/data/sample_corpus.py), so it works with no
download.
`<|mask|>` is deliberately absent: model/tokenizer.py appends it at load time (id 6400).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

from model.errors import NanoLladaError
from scripts.common.cli import Bounded
from scripts.common.data.readers import check_data_file, iter_texts

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (pad/unk, bos, eos)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts, vocab_size: int):
    """Byte-level BPE: every string is encodable (no unk), and decoding round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, f"{token} got id {tokenizer.token_to_id(token)}"
    return tokenizer


def tokenizer_config() -> dict:
    """What transformers needs to load tokenizer.json as a ChatML tokenizer (mirrors MiniMind2's settings)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): dict(content=token, lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "chat_template": CHAT_TEMPLATE,
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)."
    )
    parser.add_argument("--data", default=None, help="a .jsonl or .txt corpus (default: the offline sample corpus)")
    parser.add_argument("--jsonl-field", default="text")
    parser.add_argument(
        "--vocab-size",
        type=int,
        action=Bounded,
        low=4,
        default=6400,
        help="including the 3 special tokens (MiniMind2: 6400)",
    )
    parser.add_argument(
        "--max-docs", type=int, action=Bounded, low=1, default=None, help="train on the first N documents only"
    )
    parser.add_argument("--out-dir", default=".")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from scripts.common.cli import output_dir

    output_dir(args.out_dir, "--out-dir")  # before training: a file in the way is named now, not after the work
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise NanoLladaError(
            f"--vocab-size {args.vocab_size} is too small; byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}"
        )
    if args.data is None:
        from scripts.common.data.sample_corpus import pretrain_documents

        texts, source = pretrain_documents()[0], "the offline sample corpus"
    else:  # checked here: an error raised inside the Rust trainer's iteration would lose its message
        texts, source = iter_texts(check_data_file(args.data), args.jsonl_field), args.data
    texts = itertools.islice(texts, args.max_docs)

    start = time.perf_counter()
    tokenizer = train_bpe(texts, args.vocab_size)
    seconds = time.perf_counter() - start

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "tokenizer.json", tokenizer.to_str(pretty=True))
    write_atomic(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n")
    print(
        f"trained on {source}: vocab {tokenizer.get_vocab_size()} in {seconds:.1f}s -> "
        f"{out_dir / 'tokenizer.json'}, {out_dir / 'tokenizer_config.json'}"
    )


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
