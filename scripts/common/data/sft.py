"""SFT data for both routes: conversations rendered with the tokenizer's chat template, assistant spans marked.

One rendering for training and every eval: `chat_text` (the tokenizer's ChatML template). A conversation
is used whole: every assistant turn is a target, from its first content token through its `<|im_end|>`.
Tokens after the last assistant turn (the template's trailing newline, unanswered user turns) are dropped,
so a training row ends exactly where generation should stop.

Rows are tokenized once into a cache beside the data file (ids + a 0/1 assistant mask + offsets), and the
batch of micro-step k is a pure function of (seed, k), as for pretraining.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.cross_entropy import IGNORE_INDEX
from model.errors import NanoLladaError
from model.tokenizer import EOS_ID, PAD_ID, chat_text, encode, encode_batch, tokenizer_identity
from scripts.common.data.packing import EpochOrder, LengthGroupedOrder, cache_stem, chunks
from scripts.common.data.readers import BadLineCounter, check_data_file, iter_conversations


def encode_conversation(tokenizer, turns: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of a conversation; the mask is 1 on every assistant turn's content and <|im_end|>.

    Spans are found by rendering prefixes of the conversation: special tokens delimit turns, so the ids of a
    prefix are a prefix of the ids of the whole (checked, not assumed).
    """
    ids = encode(tokenizer, chat_text(tokenizer, turns, add_generation_prompt=False))
    mask = [0] * len(ids)
    end = 0
    for k, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prefix = encode(tokenizer, chat_text(tokenizer, turns[:k], add_generation_prompt=True))
        upto = encode(tokenizer, chat_text(tokenizer, turns[: k + 1], add_generation_prompt=False))
        if ids[: len(upto)] != upto or upto[: len(prefix)] != prefix:
            raise NanoLladaError("the chat template does not render a conversation as a concatenation of its turns")
        span_end = len(upto)
        while span_end > len(prefix) and upto[span_end - 1] != EOS_ID:
            span_end -= 1  # stop at the turn's <|im_end|>, not the newline after it
        mask[len(prefix) : span_end] = [1] * (span_end - len(prefix))
        end = span_end
    return ids[:end], mask[:end]


def encode_conversations(tokenizer, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    """encode_conversation for many conversations, with one batched (parallel) tokenizer call instead of three
    calls per assistant turn: each conversation is tokenized once with character offsets, and a span starts and
    ends where its rendered prefixes end. A conversation whose boundaries fall inside a token, or whose
    renderings are not prefixes of each other, takes encode_conversation (the reference, which also explains).
    """
    texts, bounds = [], []
    for turns in conversations:
        full, spans = chat_text(tokenizer, turns, add_generation_prompt=False), []
        for k, turn in enumerate(turns):
            if turn["role"] == "assistant":
                prefix = chat_text(tokenizer, turns[:k], add_generation_prompt=True)
                upto = (
                    full if k == len(turns) - 1 else chat_text(tokenizer, turns[: k + 1], add_generation_prompt=False)
                )
                if not (full.startswith(upto) and upto.startswith(prefix)):
                    spans = None
                    break
                spans.append((len(prefix), len(upto)))
        texts.append(full)
        bounds.append(spans)
    out = []
    for turns, spans, (ids, offsets) in zip(conversations, bounds, encode_batch(tokenizer, texts, offsets=True)):
        masked = _mask_from_offsets(ids, offsets, spans) if spans is not None else None
        out.append(masked if masked is not None else encode_conversation(tokenizer, turns))
    return out


def _mask_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]):
    """(ids, mask) as encode_conversation builds them, from character spans; None if a span edge splits a token."""
    starts = [start for start, _ in offsets]

    def token_at(char: int) -> int | None:  # index of the first token at or after `char`, if `char` is a token edge
        i = bisect.bisect_left(starts, char)
        return i if (i == len(ids) or starts[i] == char) and (i == 0 or offsets[i - 1][1] <= char) else None

    mask, end = [0] * len(ids), 0
    for first_char, last_char in spans:
        lo, hi = token_at(first_char), token_at(last_char)
        if lo is None or hi is None:
            return None
        while hi > lo and ids[hi - 1] != EOS_ID:
            hi -= 1  # stop at the turn's <|im_end|>, not the newline after it
        mask[lo:hi] = [1] * (hi - lo)
        end = hi
    return ids[:end], mask[:end]


@dataclass
class SFTExamples:
    """Tokenized conversations: example i is tokens[offsets[i]:offsets[i+1]] with its assistant mask."""

    tokens: np.ndarray
    assistant: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.assistant[lo:hi]

    def subset(self, indices) -> SFTExamples:
        parts = [self.example(int(i)) for i in indices]
        lengths = np.cumsum([0] + [len(t) for t, _ in parts])
        return SFTExamples(np.concatenate([t for t, _ in parts]), np.concatenate([a for _, a in parts]), lengths)


def load_sft_examples(path, tokenizer, max_len: int) -> SFTExamples:
    """Tokenize (once, cached beside the file) every valid conversation, truncated to max_len tokens.

    Invalid rows (no assistant turn, empty content, unknown role, malformed JSON) and rows with no assistant
    token left after truncation are counted and skipped; a summary line says how many.
    """
    path = check_data_file(path)
    template = getattr(tokenizer, "chat_template", None)
    cache = Path(f"{cache_stem(path, 'sft', tokenizer_identity(tokenizer), template, max_len)}.npz")
    if not cache.exists():
        bad, truncated, no_target = BadLineCounter(), 0, 0
        tokens, assistant, lengths = [], [], [0]
        conversations = chunks(iter_conversations(path, skip_bad_lines=True, bad=bad), 1024)
        for ids, mask in tqdm(
            (row for chunk in conversations for row in encode_conversations(tokenizer, chunk)),
            desc=f"tokenizing {path.name}",
            unit=" rows",
            leave=False,
        ):
            if len(ids) > max_len:
                truncated += 1
                ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask):
                no_target += 1
                continue
            tokens.append(np.asarray(ids, dtype=np.uint16))
            assistant.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(lengths[-1] + len(ids))
        if len(lengths) == 1:
            raise NanoLladaError(_no_usable_conversation(path, bad, no_target, max_len))
        print(
            f"{path}: {len(lengths) - 1} conversations, {truncated} truncated to {max_len} tokens, "
            f"{no_target} skipped (no answer left after truncation), {bad.count} invalid rows skipped"
            + (f" (first: {bad.first})" if bad.count else "")
        )
        tmp = Path(f"{cache}.{os.getpid()}.tmp.npz")  # its own name per process: runs started together may race
        try:
            np.savez(
                tmp,
                tokens=np.concatenate(tokens),
                assistant=np.concatenate(assistant),
                offsets=np.asarray(lengths, dtype=np.int64),
            )
            os.replace(tmp, cache)
        finally:  # Ctrl-C or a full disk leaves nothing beside the user's data
            tmp.unlink(missing_ok=True)
    data = np.load(cache)
    return SFTExamples(data["tokens"], data["assistant"], data["offsets"])


def _no_usable_conversation(path, bad: BadLineCounter, no_target: int, max_len: int) -> str:
    """Why a file gave no training conversation: invalid rows, answers cut off by --max-seq-len, or no rows."""
    reasons = []
    if no_target:
        reasons.append(
            f"{no_target} conversation(s) have no answer token within --max-seq-len {max_len} (the prompt alone "
            "fills it): raise --max-seq-len or shorten the prompts"
        )
    if bad.count:
        reasons.append(f"{bad.count} invalid row(s), first: {bad.first}")
    return f"{path}: no usable conversation: {'; '.join(reasons) or 'the file has no rows'}"


def collate(examples: SFTExamples, indices, route: str, eos_padding: int | None = None) -> dict:
    """Right-padded batch of whole conversations.

    ar: PAD padding, labels = ids on assistant tokens and IGNORE_INDEX elsewhere (padding is never a target:
    it would teach the model to emit PAD after its answer).
    diffusion: EOS padding that belongs to the answer (LLaDA SFT: it teaches where to stop); `maskable` marks
    the assistant tokens plus that padding; the prompt (user/system turns) is never masked. The padding runs to the
    batch's longest row (LLaDA), or is exactly `eos_padding` tokens per row: the columns after it are PAD, outside
    the row (`real` is False there), and never attended to.
    """
    parts = [examples.example(int(i)) for i in indices]
    capped = route == "diffusion" and eos_padding is not None
    width = max(len(ids) for ids, _ in parts) + (eos_padding if capped else 0)
    pad = PAD_ID if route == "ar" else EOS_ID
    input_ids = torch.full((len(parts), width), pad, dtype=torch.long)
    target = torch.zeros((len(parts), width), dtype=torch.bool)
    for row, (ids, mask) in enumerate(parts):
        input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
        target[row, : len(ids)] = torch.from_numpy(mask.astype(bool))
        if route == "diffusion":
            end = len(ids) + eos_padding if capped else width
            target[row, len(ids) : end] = True
            input_ids[row, end:] = PAD_ID
    if route == "ar":
        predicts_target = F.pad(target[:, 1:], (0, 1), value=False)  # position t is scored when t + 1 is a target
        labels = input_ids.masked_fill(~target, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "scored_at": flagged_first(predicts_target)}
    batch = {"input_ids": input_ids, "maskable": target, "scored_at": flagged_first(target)}
    if capped:  # each row's own columns: its conversation and its padding
        ends = torch.tensor([len(ids) + eos_padding for ids, _ in parts])
        batch["real"] = torch.arange(width)[None, :] < ends[:, None]
    return batch


def flagged_first(flags: torch.Tensor) -> torch.Tensor:
    """[B, K]: each row's flagged positions in order, then its unflagged ones, K = the most flags in a row. The
    losses run the head only at these positions (an unflagged one scores nothing); found here, on the host, so the
    loss needs no data-dependent shape."""
    count = int(flags.sum(1).max())
    return torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices[:, :count]


class SFTBatches:
    def __init__(
        self,
        examples: SFTExamples,
        batch_size: int,
        seed: int,
        route: str,
        group_by_length: bool = False,
        eos_padding: int | None = None,
    ):
        if len(examples) < batch_size:
            raise NanoLladaError(f"only {len(examples)} training conversations, fewer than --batch-size {batch_size}")
        self.examples, self.route, self.eos_padding = examples, route, eos_padding
        if group_by_length:
            self.order = LengthGroupedOrder(np.diff(examples.offsets), batch_size, seed)
        else:
            self.order = EpochOrder(len(examples), batch_size, seed)

    def batch(self, k: int) -> dict:
        return collate(self.examples, self.order.indices(k), self.route, self.eos_padding)
