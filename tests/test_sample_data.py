"""The offline sample: tags stripped, splits disjoint and deterministic, SFT rows well-formed, labels parsed."""

import json
import re

import pytest

from scripts.common.data.pairs import read_pair
from scripts.common.data.readers import iter_conversations, iter_jsonl, iter_texts
from scripts.common.data.sample_corpus import untag_line
from scripts.common.data.sentiment import SENTIMENT_LABELS, parse_sentiment, sentiment_question
from scripts.data.sample import build_sample, main, own_answer_pairs

FILES = (
    "sample_pretrain.jsonl",
    "sample_pretrain_val.jsonl",
    "sample_reviews.jsonl",
    "sample_reviews_val.jsonl",
    "sample_sft_train.jsonl",
    "sample_sft_val.jsonl",
    "sample_sft_test.jsonl",
    "sample_dpo_train.jsonl",
    "sample_dpo_val.jsonl",
    "sample_continuation_train.jsonl",
    "sample_continuation_val.jsonl",
    "sample_continuation_test.jsonl",
    "sample_dpo_continuation_train.jsonl",
    "sample_dpo_continuation_val.jsonl",
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("sample"), seed=0)


SPLITS = ("train", "val", "test")


def review_of(conversation):
    return conversation[0]["content"].split("评论：", 1)[1]


def test_all_files_written_and_non_empty(sample):
    assert sorted(sample) == sorted(FILES)
    assert all(path.stat().st_size > 0 for path in sample.values())
    assert not list(next(iter(sample.values())).parent.glob("*.tmp"))


def test_pos_tags_and_compound_brackets_are_removed(sample):
    assert untag_line("[中国/ns  政府/n]nt  发表/v  声明/n  。/w") == "中国政府发表声明。"
    assert untag_line("Windows/nx  NT/nx  系统/n") == "Windows NT系统"
    tag = re.compile(r"\S/[A-Za-z]{1,3}(\s|$)|\][a-z]{1,3}")
    for text in iter_texts(sample["sample_pretrain_val.jsonl"]):
        assert not tag.search(text), text


def test_pretraining_splits_are_disjoint(sample):
    train = set(iter_texts(sample["sample_pretrain.jsonl"]))
    val = set(iter_texts(sample["sample_pretrain_val.jsonl"]))
    assert val and not train & val
    assert 0.01 < len(val) / (len(val) + len(train)) < 0.05
    held_out_reviews = {
        review_of(c)
        for name in ("sample_sft_val.jsonl", "sample_sft_test.jsonl")
        for c in iter_conversations(sample[name])
    }
    assert not train & held_out_reviews, "SFT eval reviews leaked into pretraining"


def test_review_pretraining_texts_are_the_train_and_val_reviews_only(sample):
    """The quickstart pretrains on these: never a test review, and no label."""
    reviews = {s: {review_of(c) for c in iter_conversations(sample[f"sample_sft_{s}.jsonl"])} for s in SPLITS}
    assert set(iter_texts(sample["sample_reviews.jsonl"])) == reviews["train"]
    assert set(iter_texts(sample["sample_reviews_val.jsonl"])) == reviews["val"]


def test_sft_rows_are_valid_balanced_and_disjoint(sample):
    reviews = {}
    for split in ("train", "val", "test"):
        conversations = list(iter_conversations(sample[f"sample_sft_{split}.jsonl"], skip_bad_lines=False))
        for conversation in conversations:
            assert [turn["role"] for turn in conversation] == ["user", "assistant"]
            assert conversation[1]["content"] in SENTIMENT_LABELS
            assert conversation[0]["content"] == sentiment_question(review_of(conversation))
            assert 0 < len(review_of(conversation)) <= 300
        reviews[split] = [review_of(c) for c in conversations]
        assert len(set(reviews[split])) == len(reviews[split]), f"duplicate reviews in {split}"
        if split != "train":
            labels = [c[1]["content"] for c in conversations]
            assert len(labels) == 500 and labels.count("正面") == labels.count("负面")
    assert not set(reviews["train"]) & set(reviews["val"])
    assert not set(reviews["train"]) & set(reviews["test"])
    assert not set(reviews["val"]) & set(reviews["test"])


def test_same_seed_same_bytes(sample, tmp_path):
    again = build_sample(tmp_path, seed=0)
    for name in FILES:
        assert again[name].read_bytes() == sample[name].read_bytes(), name


def test_parse_sentiment():
    assert parse_sentiment("正面") == "正面"
    assert parse_sentiment("这条评论是负面的。") == "负面"
    assert parse_sentiment("正面还是负面呢") is None
    assert parse_sentiment("不知道") is None
    assert parse_sentiment("") is None


def test_rows_are_plain_json_objects(sample):
    with open(sample["sample_sft_test.jsonl"], encoding="utf-8") as f:
        row = json.loads(f.readline())
    assert set(row) == {"conversations"}


def test_dpo_pairs_prefer_the_gold_label_and_leave_the_test_reviews_out(sample):
    test_reviews = {review_of(c) for c in iter_conversations(sample["sample_sft_test.jsonl"])}
    for split in ("train", "val"):
        gold = {review_of(c): c[1]["content"] for c in iter_conversations(sample[f"sample_sft_{split}.jsonl"])}
        pairs = [
            read_pair(sample[f"sample_dpo_{split}.jsonl"], n, obj)
            for n, obj in iter_jsonl(sample[f"sample_dpo_{split}.jsonl"])
        ]
        assert len(pairs) == len(gold)
        for chosen, rejected in pairs:
            review = review_of(chosen)
            assert chosen[1]["content"] == gold[review] and rejected[1]["content"] != gold[review]
            assert {chosen[1]["content"], rejected[1]["content"]} == set(SENTIMENT_LABELS)
            assert review not in test_reviews


def test_continuation_pairs_prefer_the_prompts_own_continuation_to_another_prompts(sample):
    for split in ("train", "val"):
        gold = {}  # prompt -> its continuations (a sentence reprinted in two articles has two)
        for prompt, answer in iter_conversations(sample[f"sample_continuation_{split}.jsonl"]):
            gold.setdefault(prompt["content"], set()).add(answer["content"])
        answers = set().union(*gold.values())
        path = sample[f"sample_dpo_continuation_{split}.jsonl"]
        pairs = [read_pair(path, n, obj) for n, obj in iter_jsonl(path)]
        assert len(pairs) >= sum(map(len, gold.values())) - 1 and len({c[1]["content"] for c, _ in pairs}) > 1
        for chosen, rejected in pairs:
            assert chosen[0] == rejected[0] and chosen[1]["content"] in gold[chosen[0]["content"]]
            assert rejected[1]["content"] not in gold[chosen[0]["content"]] and rejected[1]["content"] in answers
    test_prompts = {c[0]["content"] for c in iter_conversations(sample["sample_continuation_test.jsonl"])}
    for split in ("train", "val"):
        path = sample[f"sample_dpo_continuation_{split}.jsonl"]
        assert not test_prompts & {
            chosen[0]["content"] for chosen, _ in (read_pair(path, n, o) for n, o in iter_jsonl(path))
        }


def test_own_answer_pairs_reject_the_models_wrong_answers(sample, tmp_path):
    gold = [c[1]["content"] for c in iter_conversations(sample["sample_sft_train.jsonl"])][:3]
    answers = [gold[0], "不知道", ""]  # right, wrong, empty (no conversation turn can be empty: skipped)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        "".join(json.dumps({"index": i, "gold": g, "answer": a}) + "\n" for i, (g, a) in enumerate(zip(gold, answers)))
    )
    pairs = own_answer_pairs(predictions)
    assert len(pairs) == 1 and pairs[0]["rejected"][1]["content"] == "不知道"
    assert pairs[0]["chosen"][1]["content"] == gold[1]
    main(["--out-dir", str(tmp_path), "--dpo-answers", str(predictions)])
    assert len((tmp_path / "sample_dpo_own.jsonl").read_text().splitlines()) == 1


def test_continuation_splits_share_no_article_and_hold_out_what_pretraining_never_saw(sample):
    """The long-answer task: val and test answers are held-out pretraining paragraphs (never training text), no
    article gives examples to two splits, and the answers are mostly 20-80 tokens of whole sentences."""
    from model.tokenizer import load_tokenizer
    from scripts.common.data.continuation import CONTINUATION_INSTRUCTION, articles, continuations
    from scripts.common.data.sample_corpus import people_daily_lines

    rows = {s: list(iter_conversations(sample[f"sample_continuation_{s}.jsonl"])) for s in SPLITS}
    pairs = {s: [(c[0]["content"], c[1]["content"]) for c in rows[s]] for s in SPLITS}
    assert len(pairs["train"]) > 5000 and min(len(pairs["val"]), len(pairs["test"])) > 100
    assert all(prompt.startswith(CONTINUATION_INSTRUCTION) for s in SPLITS for prompt, _ in pairs[s])
    pretraining = "\n".join(iter_texts(sample["sample_pretrain.jsonl"], "text"))
    held_out = set(iter_texts(sample["sample_pretrain_val.jsonl"], "text"))
    for split in ("val", "test"):
        assert not any(answer in pretraining for _, answer in pairs[split])
        assert all(any(answer in paragraph for paragraph in held_out) for _, answer in pairs[split])
    article_of = {}  # answer -> the articles whose paragraphs give it
    for i, article in enumerate(articles(people_daily_lines())):
        for paragraph in article:
            for _, answer in continuations(paragraph):
                article_of.setdefault(answer, set()).add(i)
    used = {s: set().union(*(article_of[answer] for _, answer in pairs[s])) for s in SPLITS}
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"]) and not (used["val"] & used["test"])
    lengths = [len(load_tokenizer(".").encode(answer)) for _, answer in pairs["test"]]
    assert sum(20 <= n <= 80 for n in lengths) / len(lengths) > 0.9 and all(
        a.endswith(("。", "！", "？", "”")) for _, a in pairs["test"]
    )
