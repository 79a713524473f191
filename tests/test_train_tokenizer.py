"""Tokenizer training through the CLI entry point: layout of the specials, transformers loading, chat template."""

import json

import pytest

from model.errors import NanoLladaError
from scripts.train.train_tokenizer import main

SENTENCES = [
    "今天天气很好，我们一起去公园散步吧。",
    "这本书的内容非常丰富，值得一读。",
    "人民日报报道了新年讲话的全文。",
    "机器学习模型需要大量的数据来训练。",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"text": f"{SENTENCES[i % len(SENTENCES)]}{SENTENCES[(i * 3 + 1) % len(SENTENCES)]}第{i}条"} for i in range(300)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def train(corpus, out_dir):
    main(["--data", str(corpus), "--vocab-size", "400", "--out-dir", str(out_dir)])
    return out_dir


def test_specials_and_transformers_loading(corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(train(corpus, tmp_path / "tok")))
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    )
    assert len(tokenizer) <= 400 and "<|mask|>" not in tokenizer.get_vocab()
    for text in SENTENCES + ["从未见过的字：龘靐齉", "emoji 🙂 and\ttabs\n"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert 0 not in ids  # byte-level: nothing falls back to the unk/pad token


def test_chat_template(corpus, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(train(corpus, tmp_path / "tok")))
    messages = [{"role": "user", "content": "你好"}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    messages.append({"role": "assistant", "content": "正面"})
    assert tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|im_start|>assistant\n正面<|im_end|>\n")


def test_training_is_deterministic(corpus, tmp_path):
    first, second = train(corpus, tmp_path / "a"), train(corpus, tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_missing_data_file_is_a_clean_error(tmp_path):
    with pytest.raises(NanoLladaError, match="not found"):
        main(["--data", str(tmp_path / "nope.jsonl"), "--out-dir", str(tmp_path)])
    assert not (tmp_path / "tokenizer.json").exists()


def test_too_small_vocab_is_a_clean_error(corpus, tmp_path):
    with pytest.raises(NanoLladaError, match="--vocab-size"):
        main(["--data", str(corpus), "--vocab-size", "100", "--out-dir", str(tmp_path)])
