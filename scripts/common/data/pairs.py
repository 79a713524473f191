"""Preference pairs for DPO: MiniMind's dpo.jsonl, one pair a line, {"chosen": [{"role", "content"}, ...],
"rejected": [...]}: two conversations that agree on every turn before their last turn, an assistant answer. Only
that answer is scored, rendered as SFT renders it (scripts/common/data/sft.py). A bad row stops the run with its
file:line: a preference set with broken pairs is not one to optimise silently."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.errors import NanoLladaError
from model.tokenizer import PAD_ID
from scripts.common.data.packing import EpochOrder
from scripts.common.data.readers import BadLine, conversation_of, iter_jsonl
from scripts.common.data.sft import encode_conversations

SIDES = ("chosen", "rejected")


def read_pair(path, lineno: int, obj: dict) -> tuple[list[dict], list[dict]]:
    """The (chosen, rejected) conversations of one row, checked: both present and valid, both ending in an answer,
    the same prompt."""
    sides = []
    for side in SIDES:
        if side not in obj:
            raise BadLine(
                f"{path}:{lineno}: no field '{side}' (this line has: {', '.join(sorted(obj)) or 'nothing'}); "
                "a preference pair needs 'chosen' and 'rejected' conversations"
            )
        try:
            turns = conversation_of(path, lineno, {"conversations": obj[side]})
        except BadLine as err:
            raise BadLine(f"{err} (in '{side}')") from None
        if turns[-1]["role"] != "assistant":
            raise BadLine(f"{path}:{lineno}: '{side}' must end with the assistant answer it is judged by")
        sides.append(turns)
    if sides[0][:-1] != sides[1][:-1]:
        raise BadLine(
            f"{path}:{lineno}: 'chosen' and 'rejected' have different prompts (every turn before the last answer "
            "must be the same); fix the line"
        )
    if sides[0][-1]["content"] == sides[1][-1]["content"]:  # its DPO loss is ln 2 whatever the model: no signal
        raise BadLine(
            f"{path}:{lineno}: 'chosen' and 'rejected' give the same answer, so the pair prefers nothing; "
            "fix or drop the line"
        )
    return sides[0], sides[1]


def answer_start(mask: list[int]) -> int:
    """Where the last assistant span of an SFT mask starts (the mask ends with it)."""
    start = len(mask)
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


@dataclass
class PairExamples:
    """Tokenized pairs: pair i is sides[i] = ((chosen ids, answer start), (rejected ids, answer start))."""

    sides: list

    def __len__(self) -> int:
        return len(self.sides)

    def subset(self, indices) -> PairExamples:
        return PairExamples([self.sides[i] for i in indices])


def load_pairs(path, tokenizer, max_len: int) -> PairExamples:
    """Every pair of a file, tokenized and truncated to max_len tokens; a pair whose prompt fills max_len is
    skipped (counted in a summary line)."""
    pairs = [read_pair(path, lineno, obj) for lineno, obj in iter_jsonl(path)]
    if not pairs:
        raise NanoLladaError(f"{path}: no preference pairs in the file")
    encoded = encode_conversations(tokenizer, [c for c, _ in pairs] + [r for _, r in pairs])
    sides, cut = [], 0
    for chosen, rejected in zip(encoded[: len(pairs)], encoded[len(pairs) :]):
        pair = tuple(
            (np.asarray(ids[:max_len], dtype=np.int64), answer_start(mask)) for ids, mask in (chosen, rejected)
        )
        if any(start >= max_len for _, start in pair):
            cut += 1
            continue
        sides.append(pair)
    if not sides:
        raise NanoLladaError(f"{path}: every prompt fills --max-seq-len {max_len}; raise it or shorten the prompts")
    print(f"{path}: {len(sides)} preference pairs, {cut} skipped (no answer token within --max-seq-len {max_len})")
    return PairExamples(sides)


def collate_pairs(examples: PairExamples, indices) -> dict:
    """The pair batch of model/objectives/preference.py: input_ids, answer [B, 2, T] (PAD on the right),
    length [B, 2]."""
    chosen_rejected = [examples.sides[int(i)] for i in indices]
    width = max(len(ids) for pair in chosen_rejected for ids, _ in pair)
    input_ids = torch.full((len(chosen_rejected), 2, width), PAD_ID, dtype=torch.long)
    answer = torch.zeros(input_ids.shape, dtype=torch.bool)
    length = torch.zeros(input_ids.shape[:2], dtype=torch.long)
    for row, pair in enumerate(chosen_rejected):
        for side, (ids, start) in enumerate(pair):
            input_ids[row, side, : len(ids)] = torch.from_numpy(ids)
            answer[row, side, start : len(ids)] = True
            length[row, side] = len(ids)
    return {"input_ids": input_ids, "answer": answer, "length": length}


class PairBatches:
    def __init__(self, examples: PairExamples, batch_size: int, seed: int):
        if len(examples) < batch_size:
            raise NanoLladaError(f"only {len(examples)} training pairs, fewer than --batch-size {batch_size}")
        self.examples = examples
        self.order = EpochOrder(len(examples), batch_size, seed)

    def batch(self, k: int) -> dict:
        return collate_pairs(self.examples, self.order.indices(k))
