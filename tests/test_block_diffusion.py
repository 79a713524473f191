"""Invariants of block diffusion: attention masks, the WSD curriculum, block-causal decoding and block likelihoods."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import CommitLog, UniformModel, decodes_something, lively_model

from model.block_attention import (
    bd3lm_attention_mask,
    bd3lm_document_mask,
    bdlm_forward,
    block_causal_mask,
    document_attention_mask,
    document_ids_with_pad,
)
from model.errors import NanoLladaError
from model.inference.likelihood import conditional_log_likelihood
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.objectives.block_curriculum import (
    STABLE,
    BlockCurriculum,
    default_sizes_down,
    default_sizes_up,
    trained_block_size,
)
from model.transformer import Transformer
from scripts.common.data.packing import document_ids

V, MASK, EOS = 101, 100, 2


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_bd3lm_mask_obeys_the_four_rules_elementwise(block_size):
    L = 8
    mask = bd3lm_attention_mask(L, block_size)
    assert mask.shape == (2 * L, 2 * L)
    for i in range(2 * L):
        for j in range(2 * L):
            bi, bj = (i % L) // block_size, (j % L) // block_size
            if i < L and j < L:
                expected = bi == bj  # noisy -> noisy: same block
            elif i < L:
                expected = bj < bi  # noisy -> clean: strictly earlier blocks
            elif j >= L:
                expected = bj <= bi  # clean -> clean: block-causal
            else:
                expected = False  # clean -> noisy: never
            assert bool(mask[i, j]) == expected, (i, j)
    with pytest.raises(NanoLladaError, match="does not divide"):
        bd3lm_attention_mask(8, 3)


def test_block_size_one_is_next_token_prediction_and_inference_mask_is_block_causal():
    mask = bd3lm_attention_mask(5, 1)
    # noisy position i sees only itself and the clean tokens before it: block size 1 is next-token prediction (AR)
    assert all(mask[i].nonzero().flatten().tolist() == [i] + list(range(5, 5 + i)) for i in range(5))
    blocks = torch.tensor([0, 0, 1, 1, 1, 2])
    inference = block_causal_mask(blocks)
    assert torch.equal(inference, blocks[None, :] <= blocks[:, None]) and inference.diagonal().all()


def test_noisy_block_logits_ignore_later_blocks(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(1, 99, (1, 16), generator=rng())
    noisy = ids.clone()
    noisy[0, ::3] = tiny_config.vocab_size - 1
    base = bdlm_forward(model, noisy, ids, block_size=4)
    changed_ids, changed_noisy = ids.clone(), noisy.clone()
    changed_ids[0, 8:], changed_noisy[0, 8:] = 5, 5  # blocks 2 and 3, clean and noisy
    after = bdlm_forward(model, changed_noisy, changed_ids, block_size=4)
    assert torch.allclose(base[:, :8], after[:, :8], atol=1e-6)
    assert not torch.allclose(base[:, 8:], after[:, 8:], atol=1e-3)


# ----------------------------------------------------------------------------- document mask


def packed(docs: list[list[int]]) -> torch.Tensor:
    return torch.tensor([sum(docs, [])])


def test_packed_document_logits_equal_the_document_alone(tiny_config):
    model = Transformer(tiny_config).eval()
    doc_a, doc_b, doc_c = [1, 5, 6, 7, EOS], [1, 8, 9, 10, 11, EOS], [1, 12, 13, 14, 15]
    row = packed([doc_a, doc_b, doc_c])
    docs = document_ids(row)
    assert docs.tolist() == [[0] * 5 + [1] * 6 + [2] * 5]
    logits = model(row, attention=document_attention_mask(docs))
    alone = model(torch.tensor([doc_b]), attention="bidirectional")
    # RoPE scores depend only on relative positions, so no per-document position reset is needed
    assert torch.allclose(logits[:, 5:11], alone, atol=1e-5)
    per_doc_positions = torch.arange(16) - torch.tensor([0] * 5 + [5] * 6 + [11] * 5)
    reset = model(row, attention=document_attention_mask(docs), positions=per_doc_positions)
    assert torch.allclose(reset[:, 5:11], alone, atol=1e-5)
    perturbed = packed([[1, 40, 41, 42, EOS], doc_b, doc_c])  # only document A changes
    after = model(perturbed, attention=document_attention_mask(document_ids(perturbed)))
    assert torch.allclose(after[:, 5:], logits[:, 5:], atol=1e-6) and not torch.allclose(
        after[:, :5], logits[:, :5], atol=1e-3
    )


def test_document_mask_and_block_rules_compose_without_empty_rows(tiny_config):
    model = Transformer(tiny_config).eval()
    row = packed([[1, 5, 6, EOS], [1, 8, 9, 10, 11, EOS], [1, 12, 13, 14, 0, 0]])  # ends in PAD (a cut row)
    docs = document_ids_with_pad(row, document_ids(row))
    assert docs[0, -2:].tolist() == [-1, -1]
    mask = bd3lm_document_mask(docs, block_size=4)
    assert mask.any(-1).all()  # every query attends to at least itself: no NaN rows (D3)
    assert torch.equal(mask[0, 0], bd3lm_attention_mask(16, 4) & document_attention_mask(docs.repeat(1, 2))[0, 0])
    noisy = row.masked_fill(torch.arange(16) % 3 == 0, tiny_config.vocab_size - 1)
    base = bdlm_forward(model, noisy, row, 4, document_ids(row))
    other_row, other_noisy = row.clone(), noisy.clone()
    other_row[0, 1:3], other_noisy[0, 1:3] = 50, 50  # perturb document 0 in both halves
    after = bdlm_forward(model, other_noisy, other_row, 4, document_ids(other_row))
    assert torch.isfinite(base).all() and torch.allclose(base[:, 4:], after[:, 4:], atol=1e-6)


# ----------------------------------------------------------------------------- curriculum


@pytest.mark.parametrize("seq_len,total", [(256, 1000), (64, 37), (32, 10)])
def test_curriculum_is_a_pure_monotone_function_of_the_step(seq_len, total):
    curriculum = BlockCurriculum(
        seq_len, total, tuple(default_sizes_up(seq_len)), tuple(default_sizes_down(seq_len, 32))
    )
    schedule = [curriculum.at(step) for step in range(total)]
    assert schedule == [curriculum.at(step) for step in range(total)]  # no hidden state
    assert schedule == [
        BlockCurriculum(seq_len, total, curriculum.sizes_up, curriculum.sizes_down).at(s) for s in range(total)
    ]
    phases = [phase for phase, _ in schedule]
    assert phases == sorted(phases, key=["warmup", "stable", "decay"].index)  # warmup, then stable, then decay
    assert all(seq_len % size == 0 for _, size in schedule)
    for phase, check in (("warmup", lambda a, b: a <= b), ("decay", lambda a, b: a >= b)):
        sizes = [size for p, size in schedule if p == phase]
        assert all(check(a, b) for a, b in zip(sizes, sizes[1:]))
    assert all(size == seq_len for p, size in schedule if p == STABLE)
    assert schedule[-1][1] == curriculum.inference_block_size == min(32, seq_len)
    if total >= 100:
        assert [s for p, s in schedule if p == "warmup"][0] == 1 and set(
            s for p, s in schedule if p == "warmup"
        ) == set(curriculum.sizes_up)


def test_curriculum_rejects_sizes_that_do_not_divide_and_bad_ratios():
    assert default_sizes_up(256) == [1, 4, 16, 64, 256] and default_sizes_down(256) == [256, 128, 64, 32]
    assert default_sizes_up(48) == [1, 4, 16, 48] and default_sizes_down(48, 32) == [48]
    with pytest.raises(NanoLladaError, match=r"\[24\] do not divide seq_len 64"):
        BlockCurriculum(64, 100, (1, 24, 64), (64, 32))
    with pytest.raises(NanoLladaError, match="must not increase"):
        BlockCurriculum(64, 100, (1, 64), (32, 64))
    with pytest.raises(NanoLladaError, match="summing to 1"):
        BlockCurriculum(64, 100, (1, 64), (64, 32), (0.5, 0.5, 0.5))


def test_checkpoint_block_size_follows_the_curriculum_at_its_step():
    stored = {
        "seq_len": 64,
        "total_steps": 10,
        "sizes_up": [1, 64],
        "sizes_down": [64, 32],
        "phase_ratios": [0.2, 0.5, 0.3],
    }
    extra = lambda step: {"step": step, "diffusion": {"block_curriculum": stored}}  # noqa: E731
    assert (
        trained_block_size(extra(1)) == 1
        and trained_block_size(extra(5)) is None
        and trained_block_size(extra(10)) == 32
    )
    assert trained_block_size({"block_diffusion": {"block_size": 16}}) == 16 and trained_block_size({}) is None


# ----------------------------------------------------------------------------- block-causal decoding


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, ids, attention="bidirectional", kv_cache=None, positions=None):
        self.calls.append(ids.shape[1])
        return self.inner(ids, attention=attention, kv_cache=kv_cache, positions=positions)

    def new_kv_cache(self, batch_size, max_length):
        return self.inner.new_kv_cache(batch_size, max_length)


@pytest.mark.parametrize(
    "prompt_len,options",
    [
        (5, {}),
        (8, {}),
        (5, {"threshold": 0.05}),
        (6, {"temperature": 1.0, "remasking": "random"}),
        (5, {"cfg_scale": 1.5}),
    ],
)
def test_cached_and_uncached_block_decoding_give_identical_tokens(monkeypatch, tiny_config, prompt_len, options):
    """The cache is exact: on a model whose text varies, every commit is made from the same predictions."""
    torch.manual_seed(0)
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (2, prompt_len), generator=rng())
    results, logs, log = {}, {}, CommitLog(monkeypatch)
    for cached in (True, False):
        cfg = DiffusionSamplerConfig(
            gen_length=10,
            steps=10,
            block_size=4,
            stop_at_eos=False,
            block_causal=True,
            use_kv_cache=cached,
            **options,
        )
        results[cached] = diffusion_generate(Counting(model), prompt, cfg, mask_id, generator=rng(9))
        logs[cached] = log.take()
    assert torch.equal(results[True].tokens, results[False].tokens) and decodes_something(results[True].tokens)
    assert not (results[True].tokens == mask_id).any()
    assert len(logs[True]) == len(logs[False])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logs[True], logs[False]))
    if "threshold" not in options:
        assert torch.equal(torch.stack(results[True].commits), torch.stack(results[False].commits))


def test_block_decoding_feeds_only_the_current_block_and_never_changes_earlier_blocks(tiny_config):
    torch.manual_seed(0)
    model, mask_id = Counting(lively_model(tiny_config)), tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (1, 6), generator=rng())  # blocks of 4: [0,4) prompt, [4,8) prompt tail + 2 new
    streamed = []
    cfg = DiffusionSamplerConfig(gen_length=10, steps=10, block_size=4, stop_at_eos=False, block_causal=True)
    out = diffusion_generate(model, prompt, cfg, mask_id, on_block=lambda k, block: streamed.append(block.clone()))
    assert model.calls[0] == 4  # the prompt's whole block, prefilled once
    assert set(model.calls[1:]) == {4}  # then only one block per forward (the last block here is 4 wide too)
    # prefill + decoding steps (2 + 3 + 3: a block never takes more steps than it has masks)
    # + appending 2 finished blocks
    assert out.nfe == len(model.calls) == 1 + 8 + 2
    assert [b.shape[1] for b in streamed] == [2, 4, 4] and torch.equal(torch.cat(streamed, 1), out.tokens)
    # the cached logits of a block equal one full forward under the block-causal mask (the cache is exact)
    canvas = torch.cat([prompt, out.tokens], 1)
    full = model.inner(canvas, attention=block_causal_mask(torch.arange(16) // 4))
    cache = model.inner.new_kv_cache(1, 16)
    model.inner(canvas[:, :8], attention=block_causal_mask(torch.arange(8) // 4), kv_cache=cache)
    assert torch.allclose(
        model.inner(canvas[:, 8:12], attention="bidirectional", kv_cache=cache), full[:, 8:12], atol=1e-5
    )
    with pytest.raises(NanoLladaError, match="needs block_size"):
        DiffusionSamplerConfig(gen_length=8, steps=8, block_causal=True).validate()


# ----------------------------------------------------------------------------- likelihood of block-trained models


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_block_conditional_log_likelihood_of_uniform_logits_is_minus_A_ln_V(block_size):
    estimate, stderr = conditional_log_likelihood(
        UniformModel(), [1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], MASK, num_samples=8, block_size=block_size
    )
    assert estimate == pytest.approx(-6 * math.log(V)) and stderr == pytest.approx(0, abs=1e-9)


def test_one_block_over_the_whole_row_is_the_bidirectional_estimator_with_the_same_draws(tiny_config):
    model, prompt, answer = Transformer(tiny_config).eval(), [1, 5, 6, 7, 8], [9, 10, 11]
    block = conditional_log_likelihood(
        model, prompt, answer, tiny_config.vocab_size - 1, num_samples=16, generator=rng(3), block_size=8
    )
    bidirectional = conditional_log_likelihood(
        model, prompt, answer, tiny_config.vocab_size - 1, num_samples=16, generator=rng(3)
    )
    assert block == pytest.approx(bidirectional, abs=1e-5)


def test_block_likelihood_is_exact_with_one_answer_token_per_block_and_ignores_later_blocks(tiny_config):
    """Block size 1: each answer token is scored from the clean tokens before it (nothing else is visible), in one
    draw. So it equals the product of those conditionals, and a change after a token never changes its term."""
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    prompt, answer = [1, 5, 6], [9, 10, 11]
    estimate, stderr = conditional_log_likelihood(model, prompt, answer, mask_id, block_size=1)
    seq = torch.tensor([prompt + answer])
    expected = 0.0
    for i in range(3, 6):  # token i from a canvas where only it is noised (and later positions are invisible)
        noisy = seq.clone()
        noisy[0, i] = mask_id
        logits = bdlm_forward(model, noisy, seq, 1)
        expected += torch.log_softmax(logits[0, i].float(), -1)[seq[0, i]].item()
    assert stderr == 0 and estimate == pytest.approx(expected, abs=1e-4)


def test_the_tail_of_the_last_block_is_context_never_scored(tiny_config):
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    args = (model, [1, 5, 6], [9, 10], mask_id, 4)
    unknown = conditional_log_likelihood(*args, block_size=8)
    assert unknown == conditional_log_likelihood(*args, block_size=8, tail_id=mask_id)
    assert unknown != conditional_log_likelihood(*args, block_size=8, tail_id=EOS)  # the tail is attended to
    uniform = conditional_log_likelihood(UniformModel(), [1, 5, 6], [9, 10], MASK, 4, block_size=8, tail_id=EOS)
    assert uniform[0] == pytest.approx(-2 * math.log(V))  # ... but never scored


def test_block_nelbo_rows_are_exact_for_uniform_logits_and_one_block_is_the_bidirectional_estimator(tiny_config):
    from model.inference.likelihood import diffusion_nelbo_rows, diffusion_nelbo_terms

    ids = torch.randint(1, MASK, (3, 12), generator=rng())
    scored = torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    uniform = diffusion_nelbo_rows(UniformModel(), ids, scored, MASK, 5, rng(1), block_size=5)  # padded to 15
    assert torch.allclose(uniform, torch.full((5, 3), 11 * math.log(V), dtype=torch.float64))
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    ids = torch.randint(1, mask_id, (3, 12), generator=rng())
    one_block = diffusion_nelbo_rows(model, ids, scored, mask_id, 4, rng(2), block_size=12)
    assert torch.allclose(one_block, diffusion_nelbo_rows(model, ids, scored, mask_id, 4, rng(2)), atol=1e-4)
    one_block = diffusion_nelbo_terms(model, ids, mask_id, 3, rng(3), block_size=12)
    assert torch.allclose(one_block, diffusion_nelbo_terms(model, ids, mask_id, 3, rng(3)), atol=1e-4)


def test_block_causal_decoding_counts_the_blocks_that_hold_generated_positions():
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, block_causal=True)
    # positions P .. P + 11 in blocks of 4 from position 0: P = 5 touches blocks 1-4, P = 4 blocks 1-3
    assert [sampler.decode_blocks(P) for P in (0, 4, 5, 7, 8)] == [3, 3, 4, 4, 3]
    assert all(type(sampler.decode_blocks(P)) is int for P in range(9))
