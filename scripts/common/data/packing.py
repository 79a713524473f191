"""Pretraining data: tokenize once into a memory-mapped token stream, then pack it into full rows.

Each document becomes [BOS] + tokens + [EOS] and documents are concatenated, so every row is full
(no padding) and documents are told apart by their EOS (see `document_ids`). The tokenized stream is
cached next to the data file, keyed by the tokenizer and the file, so a 1.6 GB jsonl is read once.
The batch of micro-step k is a pure function of (seed, k): resuming needs only the step counter.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.errors import NanoLladaError
from model.tokenizer import BOS_ID, EOS_ID, encode_batch, tokenizer_identity
from scripts.common.data.readers import BadLineCounter, check_data_file, iter_texts

CACHE_VERSION = 1


def chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def cache_stem(data_path: Path, tag: str, *key) -> Path:
    """Where a tokenized cache of `data_path` lives: beside it, named by a hash of `key` (what the cache depends
    on) and the file's size and mtime, so an edited file or another tokenizer gets a new cache."""
    stat = data_path.stat()
    key = json.dumps([CACHE_VERSION, *key, stat.st_size, stat.st_mtime_ns])
    return data_path.with_name(f"{data_path.name}.{tag}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def tokenize_to_cache(
    data_path, tokenizer, field: str = "text", skip_bad_lines: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16 memmap, document end offsets) of a jsonl/txt file, built once and cached beside it."""
    data_path = check_data_file(data_path)
    stem = cache_stem(data_path, "tok", tokenizer_identity(tokenizer), field)
    tokens_path, ends_path = Path(f"{stem}.bin"), Path(f"{stem}.ends.npy")
    if not (tokens_path.exists() and ends_path.exists()):
        # Names of its own per process: runs started together on the same data each write theirs, the last wins.
        temp_files = (Path(f"{tokens_path}.{os.getpid()}.tmp"), Path(f"{ends_path}.{os.getpid()}.tmp.npy"))
        try:
            _write_token_cache(data_path, tokenizer, field, skip_bad_lines, temp_files)
            os.replace(temp_files[1], ends_path)
            os.replace(temp_files[0], tokens_path)
        finally:  # a data error, Ctrl-C or a full disk leaves nothing beside the user's data
            for temp in temp_files:
                temp.unlink(missing_ok=True)
    return np.memmap(tokens_path, dtype=np.uint16, mode="r"), np.load(ends_path)


def _write_token_cache(data_path: Path, tokenizer, field: str, skip_bad_lines: bool, temp_files) -> None:
    """Tokenize every document into temp_files (the token stream, the document ends)."""
    bad = BadLineCounter()
    ends, total = [], 0
    with open(temp_files[0], "wb") as out:
        texts = iter_texts(data_path, field, skip_bad_lines, bad)
        for batch in tqdm(chunks(texts, 2048), desc=f"tokenizing {data_path.name}", unit=" x2048 docs", leave=False):
            for ids in encode_batch(tokenizer, batch):
                doc = np.asarray([BOS_ID, *ids, EOS_ID], dtype=np.uint16)
                out.write(doc.tobytes())
                total += len(doc)
                ends.append(total)
    if bad.summary(data_path):
        print(bad.summary(data_path))
    if not ends:
        raise NanoLladaError(f"{data_path}: no documents found (every line empty or skipped)")
    np.save(temp_files[1], np.asarray(ends, dtype=np.int64))


def document_ids(input_ids: torch.Tensor, eos_id: int = EOS_ID) -> torch.Tensor:
    """Per-position document index within each row: it increases after every EOS (the EOS closes its doc)."""
    is_eos = (input_ids == eos_id).long()
    return is_eos.cumsum(-1) - is_eos


@dataclass
class PackedRows:
    """Non-overlapping rows of `seq_len` tokens cut from a token stream; a final partial row is dropped."""

    tokens: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        self.num_rows = len(self.tokens) // self.seq_len
        if self.num_rows == 0:
            raise NanoLladaError(
                f"only {len(self.tokens)} tokens, fewer than one row of {self.seq_len}; "
                "use more data or a smaller sequence length"
            )

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len : (i + 1) * self.seq_len]

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.row(int(i)) for i in rows]).astype(np.int64))


class EpochOrder:
    """Indices of batch k over epochs of a shuffled dataset: a pure function of (seed, k)."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = num_items // batch_size  # the last partial batch of an epoch is dropped
        self._order: tuple[int, np.ndarray] | None = None

    def indices(self, k: int) -> np.ndarray:
        epoch, index = divmod(k, self.batches_per_epoch)
        return self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The items of one epoch in the order its batches take them."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items))
        return self._order[1]


class LengthGroupedOrder(EpochOrder):
    """EpochOrder with batches of similar lengths: each run of `group` batches of the shuffled epoch is sorted by
    length and cut into batches, and the epoch's batches are shuffled again. A batch is padded to its longest item,
    so this spends far less compute on padding when lengths vary (SFT conversations); still a pure function of
    (seed, k)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group: int = 16):
        super().__init__(len(lengths), batch_size, seed)
        self.lengths, self.group = np.asarray(lengths), group
        self._grouped: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._grouped is None or self._grouped[0] != epoch:
            shuffled = super().epoch_order(epoch)[: self.batches_per_epoch * self.batch_size]
            span = self.group * self.batch_size
            runs = [shuffled[i : i + span] for i in range(0, len(shuffled), span)]
            by_length = np.concatenate([run[np.argsort(self.lengths[run], kind="stable")] for run in runs])
            batches = by_length.reshape(self.batches_per_epoch, self.batch_size)
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.batches_per_epoch)
            self._grouped = (epoch, batches[order].reshape(-1))
        return self._grouped[1]


class PackedBatches:
    """Shuffled batches of packed rows over epochs; batch k (a micro-step) depends only on (seed, k)."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        if rows.num_rows < batch_size:
            raise NanoLladaError(
                f"the training split has {rows.num_rows} rows of {rows.seq_len} tokens, "
                f"fewer than --batch-size {batch_size}; lower the batch size or add data"
            )
        self.rows, self.batch_size = rows, batch_size
        self.order = EpochOrder(rows.num_rows, batch_size, seed)
        self.batches_per_epoch = self.order.batches_per_epoch

    def batch(self, k: int) -> torch.Tensor:
        return self.rows.gather(self.order.indices(k))


def split_train_val(
    tokens: np.ndarray, doc_ends: np.ndarray, val_fraction: float, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last documents (about val_fraction of the tokens, at least one row) for validation."""
    want = max(int(len(tokens) * val_fraction), seq_len)
    cut_doc = np.searchsorted(doc_ends, len(tokens) - want, side="right")
    cut = int(doc_ends[cut_doc - 1]) if cut_doc > 0 else 0
    if cut < seq_len or len(tokens) - cut < seq_len:
        raise NanoLladaError(_split_problem(len(tokens), len(doc_ends), want, cut, seq_len))
    held = len(tokens) - cut
    if held > len(tokens) // 2:  # --val-fraction is < 0.5: a long last document, never trained on, took the rest
        raise NanoLladaError(
            f"validation holds out whole documents from the end, and the last ones are {held} of the {len(tokens)} "
            f"tokens ({held / len(tokens):.0%}, asked {val_fraction:.1%}); put a shorter document last, or split the "
            "long ones into several (one per line or jsonl row)"
        )
    if held > 2 * want:
        print(f"note: validation holds out {held} tokens ({held / len(tokens):.1%}): the last documents are long")
    return tokens[:cut], tokens[cut:]


def _split_problem(num_tokens: int, num_docs: int, want: int, cut: int, seq_len: int) -> str:
    """Why no split exists: too few tokens, or documents so long that the held-out ones leave no training row."""
    if num_tokens < 2 * seq_len:
        return (
            f"{num_tokens} tokens are too few to hold out a validation row of {seq_len} tokens and keep one "
            "for training; add data or lower --max-seq-len"
        )
    if num_docs == 1:
        return (
            f"the data is a single document of {num_tokens} tokens; validation holds out whole documents, so "
            "split the text into several (one per line, or one jsonl row each)"
        )
    return (
        f"{num_docs} documents of {num_tokens} tokens in all: validation holds out whole documents from the end "
        f"(at least {want} tokens), which leaves {cut} tokens, less than one training row of {seq_len}; "
        "split the long documents into several (one per line or jsonl row)"
    )
