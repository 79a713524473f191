"""The repo's tokenizer and MiniMind2's: special ids, <|mask|> at 6400, chat template, safe decoding."""

from pathlib import Path

import pytest

from model.errors import NanoLladaError
from model.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    StreamingDecoder,
    chat_text,
    decode,
    encode,
    load_tokenizer,
    mask_token_id,
    prompt_ids,
    tokenizer_identity,
)


@pytest.fixture(params=["repo", "minimind2"])
def tokenizer(request):
    """The repository's tokenizer always; MiniMind2's where the shared fixture is present (else an explicit skip)."""
    return load_tokenizer("." if request.param == "repo" else request.getfixturevalue("minimind2_fixtures"))


def test_special_ids_and_mask_id(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        PAD_ID,
        BOS_ID,
        EOS_ID,
    ]
    assert mask_token_id(tokenizer) == 6400 and len(tokenizer) == 6401
    assert encode(tokenizer, "<|im_start|>你好<|im_end|>")[0] == BOS_ID


def test_loading_twice_adds_the_mask_once_and_identity_is_stable():
    a, b = load_tokenizer("."), load_tokenizer(".")
    assert tokenizer_identity(a) == tokenizer_identity(b) and tokenizer_identity(a)["vocab_size"] == 6401


def test_repo_chat_template_is_chatml():
    tok = load_tokenizer(".")
    text = chat_text(tok, [{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_ids(tok, "你好", chat=True) == encode(tok, text)
    assert prompt_ids(tok, "你好", chat=False) == [BOS_ID, *encode(tok, "你好")]


def test_round_trip_and_no_broken_bytes_when_streaming(tokenizer):
    text = "中国人民，欢迎！Hello 😀"
    ids = encode(tokenizer, text)
    assert decode(tokenizer, ids) == text
    stream = StreamingDecoder(tokenizer)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    emoji_bytes = encode(tokenizer, "😀")
    if len(emoji_bytes) > 1:  # a generation cut inside a multi-byte character drops the incomplete tail
        assert decode(tokenizer, encode(tokenizer, "好") + emoji_bytes[:-1]) == "好"


def test_missing_tokenizer_dir_is_explained(tmp_path):
    with pytest.raises(NanoLladaError, match="no tokenizer.json here"):
        load_tokenizer(tmp_path)


def test_decode_drops_special_tokens_by_default():
    # Fixture-free: the repo's tokenizer only.
    tokenizer = load_tokenizer(Path(__file__).resolve().parents[1])
    text = encode(tokenizer, "hello 你好")
    ids = [BOS_ID, *text, EOS_ID, PAD_ID]
    assert decode(tokenizer, ids) == decode(tokenizer, text) and "<|im_start|>" not in decode(tokenizer, ids)
    assert decode(tokenizer, ids, skip_special_tokens=False).startswith("<|im_start|>")
