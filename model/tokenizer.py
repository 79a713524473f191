"""Tokenizer loading (the one place `<|mask|>` is added), identity hashing, chat formatting, safe decoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from model.config import MASK_TOKEN
from model.errors import NanoLladaError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # <|endoftext|>, <|im_start|>, <|im_end|>, exactly as MiniMind2
SPECIAL_TOKENS = {"<|endoftext|>": PAD_ID, "<|im_start|>": BOS_ID, "<|im_end|>": EOS_ID}


def load_tokenizer(tokenizer_dir: str | Path):
    """Load a tokenizer directory (this repo's or MiniMind2's) and append `<|mask|>` after the base vocabulary.

    The base vocabulary is 6400 for both, so the mask id is 6400 and every model has vocab_size 6401.
    """
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").is_file():
        raise NanoLladaError(
            f"{path}: no tokenizer.json here; use the repo's root directory (its tokenizer), MiniMind2's tokenizer "
            "directory, or a directory written by the tokenizer trainer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # transformers raises many types for a broken directory
        raise NanoLladaError(f"{path}: could not load the tokenizer ({err.__class__.__name__}: {err})") from None
    for token, expected in SPECIAL_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise NanoLladaError(
                f"{path}: special token {token} must have id {expected} (MiniMind2's layout); retrain the tokenizer "
                "with that layout"
            )
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    if tokenizer.convert_tokens_to_ids(MASK_TOKEN) != len(tokenizer) - 1:
        raise NanoLladaError(f"{path}: {MASK_TOKEN} must be the last token of the vocabulary")
    return tokenizer


def mask_token_id(tokenizer) -> int:
    """The id of `<|mask|>`, the one source of truth for it. load_tokenizer appends the token after the base
    vocabulary, so its id depends on the tokenizer (6400 for the repo's and MiniMind2's, another for a tokenizer
    trained with another vocabulary size); no constant can know it. A model's vocabulary is its tokenizer's
    (checked when a checkpoint is loaded), so code that holds only a model finds it as the last id,
    config.vocab_size - 1."""
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN)


def tokenizer_identity(tokenizer) -> dict:
    """Vocabulary size and a hash of the token->id map, stored in checkpoints to catch a mismatched tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"vocab_size": len(tokenizer), "sha256": digest}


def check_tokenizer_matches(identity: dict | None, tokenizer, checkpoint_path, tokenizer_dir) -> None:
    if identity is None:  # MiniMind2 files carry no tokenizer identity
        return
    mine = tokenizer_identity(tokenizer)
    if mine != identity:
        raise NanoLladaError(
            f"{checkpoint_path}: trained with a different tokenizer (vocab {identity['vocab_size']}, hash "
            f"{identity['sha256']}) than {tokenizer_dir} (vocab {mine['vocab_size']}, hash {mine['sha256']}); "
            "use the tokenizer directory it was trained with"
        )


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text; special-token strings in the text (e.g. <|im_start|>) become their ids."""
    return tokenizer.encode(text, add_special_tokens=False)


def encode_batch(tokenizer, texts: list[str], offsets: bool = False) -> list:
    """encode for many texts at once, in parallel in the Rust tokenizer (transformers' own batch call spends more
    time converting its output than encoding). With offsets: (ids, character spans) per text."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [(e.ids, e.offsets) for e in encodings] if offsets else [e.ids for e in encodings]


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The one chat rendering used by training and every eval: the tokenizer's own (ChatML) template."""
    if not getattr(tokenizer, "chat_template", None):
        raise NanoLladaError(
            "this tokenizer has no chat template; use the repo's tokenizer (its root directory) or MiniMind2's"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Pretraining layout is [BOS] + text; chat layout is the template (which starts with <|im_start|>)."""
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return encode(tokenizer, chat_text(tokenizer, messages, add_generation_prompt=True))
    return [BOS_ID, *encode(tokenizer, prompt)]


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """Decode a finished generation; an incomplete UTF-8 tail (a cut multi-byte character) is dropped."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens).rstrip("\ufffd")


class StreamingDecoder:
    """Turns a growing list of ids into printable text deltas, holding back a cut multi-byte character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.printed = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        stable = text.rstrip("\ufffd")  # a trailing replacement char may be completed by the next token
        delta, self.printed = stable[self.printed :], max(self.printed, len(stable))
        return delta
