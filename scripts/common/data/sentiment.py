"""The review-sentiment task of the offline sample: its labels, the question it asks, and how an answer is read.

Shared by the sample builder (scripts/data/sample.py), which writes the questions, and the SFT accuracy eval
(scripts/eval/eval_sft_accuracy.py), which reads the answers.
"""

from __future__ import annotations

SENTIMENT_LABELS = ("正面", "负面")


def sentiment_question(review: str) -> str:
    return f"下面这条商品评论的情感是正面还是负面？请只回答“正面”或“负面”。\n评论：{review}"


def parse_sentiment(answer: str) -> str | None:
    """The label an answer states; None when it states neither or both."""
    stated = [label for label in SENTIMENT_LABELS if label in answer]
    return stated[0] if len(stated) == 1 else None
