"""Readers (errors name file:line) and packing (every token exactly once, deterministic batches, doc ids)."""

import json

import numpy as np
import pytest
import torch

from model.errors import NanoLladaError
from scripts.common.data.packing import (
    EpochOrder,
    LengthGroupedOrder,
    PackedBatches,
    PackedRows,
    document_ids,
    split_train_val,
)
from scripts.common.data.readers import BadLineCounter, iter_conversations, iter_texts


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_and_txt_documents(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", [json.dumps({"text": "一"}), "", json.dumps({"text": "二", "x": 1})])
    txt = write(tmp_path / "a.txt", ["第一", "", "第二"])
    assert list(iter_texts(jsonl)) == ["一", "二"]
    assert list(iter_texts(txt)) == ["第一", "第二"]


def test_malformed_line_names_file_and_line_and_can_be_skipped(tmp_path):
    path = write(tmp_path / "bad.jsonl", [json.dumps({"text": "ok"}), "{not json", json.dumps({"text": "ok2"})])
    with pytest.raises(NanoLladaError, match=r"bad\.jsonl:2: malformed JSON.*fix the line"):
        list(iter_texts(path))
    bad = BadLineCounter()
    assert list(iter_texts(path, skip_bad_lines=True, bad=bad)) == ["ok", "ok2"]
    assert bad.count == 1 and "bad.jsonl: skipped 1 bad line" in bad.summary(path)


@pytest.mark.parametrize(
    "lines,match",
    [
        ([json.dumps({"content": "x"})], r":1: no field 'text' \(this line has: content\); pass --jsonl-field"),
        ([json.dumps({"text": 3})], "field 'text' is int"),
        ([json.dumps([1, 2])], "expected a JSON object"),
    ],
)
def test_missing_or_wrong_fields(tmp_path, lines, match):
    with pytest.raises(NanoLladaError, match=match):
        list(iter_texts(write(tmp_path / "f.jsonl", lines)))


def test_missing_and_empty_files_say_how_to_get_data(tmp_path):
    with pytest.raises(NanoLladaError, match="not found; build the offline sample"):
        list(iter_texts(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(NanoLladaError, match="empty"):
        list(iter_texts(tmp_path / "empty.jsonl"))


def test_sft_rows_are_validated_and_bad_ones_counted(tmp_path):
    good = {"conversations": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}
    rows = [
        good,
        {"conversations": [{"role": "user", "content": "只有问题"}]},
        {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"conversations": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
        {"text": "no conv"},
    ]
    path = write(tmp_path / "sft.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows])
    bad = BadLineCounter()
    assert list(iter_conversations(path, bad=bad)) == [good["conversations"]]
    assert bad.count == 4
    with pytest.raises(NanoLladaError, match=r"sft\.jsonl:2: no assistant turn"):
        list(iter_conversations(path, skip_bad_lines=False))


def test_packing_keeps_every_token_exactly_once_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    rows = PackedRows(tokens, 32)
    batches = PackedBatches(rows, batch_size=4, seed=1)
    seen = torch.cat([batches.batch(k).flatten() for k in range(batches.batches_per_epoch)])
    assert rows.num_rows == 31 and batches.batches_per_epoch == 7
    assert len(set(seen.tolist())) == len(seen) == 7 * 4 * 32  # no token twice
    all_rows = torch.cat([rows.gather([i]) for i in range(rows.num_rows)]).flatten()
    assert torch.equal(all_rows, torch.arange(31 * 32))  # rows tile the stream in order, dropping only the tail < 32


def test_batches_are_a_pure_function_of_seed_and_step():
    rows = PackedRows(np.arange(4096, dtype=np.uint16), 16)
    a, b = PackedBatches(rows, 8, seed=3), PackedBatches(rows, 8, seed=3)
    order = [5, 0, 40, 5]
    assert all(torch.equal(a.batch(k), b.batch(k)) for k in order)
    assert not torch.equal(a.batch(0), a.batch(a.batches_per_epoch))  # reshuffled next epoch


def test_length_grouped_batches_cover_the_epoch_once_with_less_padding():
    """Every item once per epoch (the same items as the plain order's full batches), batches of similar length
    (padding to each batch's longest shrinks), and a pure function of (seed, k)."""
    lengths = np.random.default_rng(0).integers(10, 200, size=1000)
    grouped, plain = LengthGroupedOrder(lengths, 16, seed=3), EpochOrder(1000, 16, seed=3)
    for epoch in range(2):
        batches = [grouped.indices(epoch * 62 + k) for k in range(62)]
        items = np.concatenate(batches)
        assert len(set(items.tolist())) == 62 * 16
        assert sorted(items) == sorted(np.concatenate([plain.indices(epoch * 62 + k) for k in range(62)]))
    padded = lambda order: sum(lengths[order.indices(k)].max() * 16 for k in range(62))  # noqa: E731
    assert padded(grouped) < 0.75 * padded(plain)
    again = LengthGroupedOrder(lengths, 16, seed=3)
    assert all((again.indices(k) == grouped.indices(k)).all() for k in (70, 5, 61))


def test_document_ids_split_on_eos():
    ids = torch.tensor([[1, 5, 6, 2, 1, 7, 2, 1, 8]])
    assert document_ids(ids).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2]]


def test_validation_split_is_on_a_document_boundary():
    tokens = np.arange(100, dtype=np.uint16)
    ends = np.array([30, 60, 90, 100])
    train, val = split_train_val(tokens, ends, val_fraction=0.2, seq_len=10)
    assert len(train) + len(val) == 100 and len(train) in (60, 90) and len(val) >= 10
    with pytest.raises(NanoLladaError, match="too few"):
        split_train_val(tokens, ends, 0.5, seq_len=80)


def test_span_edges_inside_a_token_send_the_conversation_to_the_reference():
    from scripts.common.data.sft import _mask_from_offsets

    ids, offsets = [10, 11, 2, 12], [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert _mask_from_offsets(ids, offsets, [(2, 6)]) == ([10, 11, 2], [0, 1, 1])  # cut after the span's <|im_end|>
    assert _mask_from_offsets(ids, offsets, [(1, 6)]) is None  # starts inside token 0
    assert _mask_from_offsets(ids, [(0, 2), (1, 3), (3, 5), (5, 6)], [(2, 6)]) is None  # a token straddles char 2
