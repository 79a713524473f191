"""The long-answer task of the offline sample: news continuation. The prompt is the first sentence or two of a
People's Daily paragraph, the answer the next sentence or two (30-120 characters, about 20-80 tokens), and on
along the paragraph, so an SFT objective is tried on answers of more than one decision.

Splits never share an article, and the held-out answers are never pretraining text: val and test come from the
paragraphs the sample's pretraining split holds out (sample_pretrain_val.jsonl), divided between val and test by
article, and train comes only from articles none of whose paragraphs is held out. The file has no article ids; an
article starts at a title, a short line without sentence-final punctuation after a body paragraph.
"""

from __future__ import annotations

import random
import re

from scripts.common.data.sample_corpus import MIN_PARAGRAPH_CHARS, people_daily_lines

CONTINUATION_INSTRUCTION = "续写下面这段新闻：\n"
PROMPT_CHARS = (20, 160)  # the prompt: whole sentences, within these bounds
ANSWER_CHARS = (30, 120)  # the answer: one or two whole sentences, within these bounds
TITLE_MAX_CHARS = 40
_SENTENCE = re.compile(r"[^。！？]*[。！？]”?")


def articles(lines) -> list[list[str]]:
    """Consecutive untagged lines grouped into articles: a short line without sentence-final punctuation that
    follows a body line starts a new one (titles; a subtitle right after a title stays with it)."""
    grouped: list[list[str]] = []
    for line in lines:
        if not grouped or (_is_title(line) and not _is_title(grouped[-1][-1])):
            grouped.append([])
        grouped[-1].append(line)
    return grouped


def _is_title(line: str) -> bool:
    return len(line) <= TITLE_MAX_CHARS and not line.endswith(("。", "！", "？", "”", "：", "；"))


def continuations(paragraph: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from one paragraph, left to right without overlapping answers: the shortest run of
    sentences before the answer that reaches the prompt's minimum, then one or two sentences as the answer, each
    within its character bounds."""
    sentences, pairs, start = _SENTENCE.findall(paragraph), [], 0
    while start < len(sentences):
        prompt, k = "", start
        while k < len(sentences) and len(prompt) < PROMPT_CHARS[0]:
            prompt, k = prompt + sentences[k], k + 1
        answer = next(
            (n for n in (1, 2) if ANSWER_CHARS[0] <= len("".join(sentences[k : k + n])) <= ANSWER_CHARS[1]), None
        )
        if answer is not None and k + answer <= len(sentences) and len(prompt) <= PROMPT_CHARS[1]:
            pairs.append((prompt, "".join(sentences[k : k + answer])))
            start = k + answer
        else:
            start += 1
    return pairs


def split_continuations(
    pretraining: list[str], held_out_paragraphs: list[str], seed: int = 0
) -> dict[str, list[tuple[str, str]]]:
    """(prompt, answer) pairs for train, val and test, given the sample's pretraining split (pretrain_documents: the
    training documents and the held-out paragraphs; see the module docstring for what keeps the splits apart)."""
    held_out, seen = set(held_out_paragraphs), "\n".join(pretraining)
    train, held = [], []
    for article in articles(people_daily_lines()):
        body = [p for p in article if len(p) >= MIN_PARAGRAPH_CHARS]
        if any(p in held_out for p in body):
            held.append([p for p in body if p in held_out])
        else:
            train += body
    rng = random.Random(seed)
    rng.shuffle(held)
    val = dict.fromkeys(p for article in held[: len(held) // 2] for p in article)
    test = dict.fromkeys(p for article in held[len(held) // 2 :] for p in article if p not in val)  # repeated ones
    splits = {"train": _pairs(dict.fromkeys(train))}
    for name, paragraphs in (("val", val), ("test", test)):  # a reprinted paragraph may hold the same sentences
        splits[name] = [(prompt, answer) for prompt, answer in _pairs(paragraphs) if answer not in seen]
    for pairs in splits.values():
        rng.shuffle(pairs)
    return splits


def _pairs(paragraphs) -> list[tuple[str, str]]:
    return [pair for paragraph in paragraphs for pair in continuations(paragraph)]
