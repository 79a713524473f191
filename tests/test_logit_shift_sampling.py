"""Diffusion sampling of a logit-shifted model (the prediction for column j is the output at column j - 1): every
sampler path reads the shift, the exact caches stay exact, and with blocks of one token it is the AR model."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODEL, CommitLog, lively_model

from model.config import ModelConfig
from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig, generate
from model.inference.padding import left_pad
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate

V, MASK = 101, 100
PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 99], [44]]


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def shifted_pair() -> tuple[nn.Module, nn.Module]:
    """(AR model, the same weights as a logit-shifted diffusion model)."""
    ar = lively_model(ModelConfig(**TINY_MODEL, vocab_size=V, max_position_embeddings=256))
    shifted = lively_model(replace(ar.config, logit_shift=True))
    shifted.load_state_dict(ar.state_dict())
    return ar, shifted


def ar_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    return list(generate(model, prompt, new_tokens, ARSamplerConfig(banned_ids=(MASK,))))


class PositionCausal(nn.Module):
    """The wrapped model under causal attention by true position, whatever attention the sampler asks for (a
    padding mask is kept): its outputs never depend on later columns, so prefix and dual caches are exact for it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.key_positions = inner, inner.config, None

    def forward(self, ids, attention="bidirectional", kv_cache=None, positions=None):
        past = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = past + torch.arange(ids.shape[1])
        positions = positions.expand(ids.shape)
        keys = positions if past == 0 else torch.cat([self.key_positions[:, :past], positions], 1)
        if kv_cache is not None:  # the cache holds keys in the order they were fed
            self.key_positions = keys
        mask = (keys[:, None, :] <= positions[:, :, None])[:, None]
        if isinstance(attention, torch.Tensor):
            mask = mask & attention
        return self.inner(ids, attention=mask, kv_cache=kv_cache, positions=positions)

    def new_kv_cache(self, batch_size, max_length):
        return self.inner.new_kv_cache(batch_size, max_length)


def test_block_causal_decoding_with_blocks_of_one_token_is_the_ar_models_greedy_decoding():
    ar, shifted = shifted_pair()
    for prompt_len in (1, 3, 6):
        prompts = torch.randint(1, MASK, (2, prompt_len), generator=rng(prompt_len))
        expected = torch.tensor([ar_greedy(ar, row.tolist(), 10) for row in prompts])
        for use_kv_cache in (True, False):
            sampler = DiffusionSamplerConfig(
                gen_length=10, steps=10, block_size=1, block_causal=True, use_kv_cache=use_kv_cache
            )
            out = diffusion_generate(shifted, prompts, sampler, MASK)
            assert torch.equal(out.tokens, expected), (prompt_len, use_kv_cache)
    assert len(set(expected[0].tolist())) > 3  # the case is not trivial


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_bidirectional_paths_of_a_causal_model_with_blocks_of_one_token_are_ar_greedy_for_padded_prompts(cache):
    """A causal model seen through each bidirectional path: column j's prediction is the output at j - 1, which has
    seen exactly the tokens an AR step sees."""
    ar, shifted = shifted_pair()
    sampler = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=1, cache=cache, stop_at_eos=False)
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    out = diffusion_generate(PositionCausal(shifted), ids, sampler, MASK, prompt_lengths=lengths)
    assert out.tokens.tolist() == [ar_greedy(ar, p, 8) for p in PROMPTS]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"cfg_scale": 1.0}, {"cfg_scale": 1.0, "threshold": 0.5}])
@pytest.mark.parametrize("padded", [False, True])
def test_prefix_and_dual_caches_are_exact_for_a_model_that_ignores_later_columns(cache, options, padded):
    """The cached K/V go stale only for columns a causal model never reads, so its cached decoding is its uncached
    decoding at every step, the column left of the block (fed again for its fresh output) included."""
    _, shifted = shifted_pair()
    model = PositionCausal(shifted)
    ids, lengths = left_pad(PROMPTS, pad_id=0) if padded else (torch.tensor([[1, p[-1]] for p in PROMPTS]), None)
    base = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, stop_at_eos=False, **options)
    uncached = diffusion_generate(model, ids, base, MASK, prompt_lengths=lengths)
    cached = diffusion_generate(model, ids, replace(base, cache=cache), MASK, prompt_lengths=lengths)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.nfe == uncached.nfe
    assert len(set(uncached.tokens.flatten().tolist())) > 3


@pytest.mark.parametrize("prompt_len", [3, 4, 6, 8])
@pytest.mark.parametrize(
    "options",
    [{}, {"threshold": 0.05}, {"temperature": 1.0, "remasking": "random"}, {"cfg_scale": 1.5}],
)
def test_block_causal_cache_gives_the_uncached_predictions_and_tokens(monkeypatch, prompt_len, options):
    """Prompt lengths below, at and between multiples of the block size; the block's first column is predicted
    from the previous block's last output, which the cached path carries from the pass that cached that block."""
    _, shifted = shifted_pair()
    prompts = torch.randint(1, MASK, (2, prompt_len), generator=rng(prompt_len))
    results, logs, log = {}, {}, CommitLog(monkeypatch)
    for cached in (True, False):
        sampler = DiffusionSamplerConfig(
            gen_length=10, steps=10, block_size=4, stop_at_eos=False, block_causal=True, use_kv_cache=cached, **options
        )
        results[cached] = diffusion_generate(shifted, prompts, sampler, MASK, generator=rng(9))
        logs[cached] = log.take()
    assert torch.equal(results[True].tokens, results[False].tokens) and not (results[True].tokens == MASK).any()
    assert len(logs[True]) == len(logs[False])
    for with_cache, without in zip(logs[True], logs[False]):
        assert torch.allclose(with_cache, without, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"cfg_scale": 1.0}, {"threshold": 0.3}])
def test_block_causal_cache_gives_the_uncached_predictions_when_rows_leave_the_batch(monkeypatch, options):
    """A row that wrote EOS leaves the batch, its rows of the cache and of the carried output with it.
    (Batched equals one at a time: test_batched_generation, with and without the shift.)"""
    _, shifted = shifted_pair()
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, block_causal=True, **options)
    prompts = torch.tensor([[1, 5, 9, 33, 8, 2], [1, 7, 3, 3, 40, 41], [1, 2, 3, 4, 5, 99]])
    eos = int(diffusion_generate(shifted, prompts[2:], sampler, MASK).tokens[0, 0])  # row 2 ends in its first block
    log, results, logs = CommitLog(monkeypatch), {}, {}
    for cached in (True, False):
        results[cached] = diffusion_generate(shifted, prompts, replace(sampler, use_kv_cache=cached), MASK, eos_id=eos)
        logs[cached] = log.take()
    assert torch.equal(results[True].tokens, results[False].tokens)
    assert (results[True].tokens[2, 2:] == eos).all() and not (results[True].tokens[:2, 2:] == eos).all(1).any()
    assert logs[True][-1].shape[0] < logs[True][0].shape[0]  # row 2 left the batch
    assert [x.shape for x in logs[True]] == [x.shape for x in logs[False]]
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(logs[True], logs[False]))


class Increment(nn.Module):
    """A shifted model whose output at a column says, confidently, "the next token is this one plus 1" (nothing
    where the column is masked): decoded with its shift, it counts up from the prompt's last token on every path."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(logit_shift=True, max_position_embeddings=256)

    def forward(self, ids, attention="bidirectional", kv_cache=None, positions=None):
        if kv_cache is not None:
            kv_cache.length += ids.shape[1]
        logits = nn.functional.one_hot((ids + 1) % MASK, V).float() * 10
        return logits.masked_fill((ids == MASK)[..., None], 0.0)

    def new_kv_cache(self, batch_size, max_length):
        return LengthOnlyCache()


class LengthOnlyCache:
    """A K/V cache with nothing in it but its length, for a model whose outputs need no keys or values."""

    length = 0

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def keep_rows(self, rows) -> None:
        pass


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"threshold": 0.9},
        {"cache": "prefix"},
        {"cache": "dual", "threshold": 0.9},
        {"cfg_scale": 1.0, "cache": "dual"},
        {"block_causal": True},
        {"block_causal": True, "use_kv_cache": False},
        {"block_causal": True, "cfg_scale": 1.0},
    ],
)
@pytest.mark.parametrize("prompt_len", [1, 4, 6])
def test_every_path_predicts_a_column_from_the_output_one_column_to_its_left(options, prompt_len):
    model = Increment()
    prompts = torch.tensor([[7] * (prompt_len - 1) + [20], [9] * (prompt_len - 1) + [50]])
    # at least one step per masked position of every block: each step commits only the one column it can predict
    sampler = DiffusionSamplerConfig(gen_length=12, steps=16, block_size=4, stop_at_eos=False, **options)
    out = diffusion_generate(model, prompts, sampler, MASK)
    assert out.tokens.tolist() == [list(range(21, 33)), list(range(51, 63))]
    if not options.get("block_causal"):
        ids, lengths = left_pad([[20], [3, 4, 5, 50]], pad_id=0)
        padded = diffusion_generate(model, ids, sampler, MASK, prompt_lengths=lengths)
        assert padded.tokens.tolist() == [list(range(21, 33)), list(range(51, 63))]


def test_a_shifted_model_refuses_an_empty_prompt():
    _, shifted = shifted_pair()
    sampler = DiffusionSamplerConfig(gen_length=4, steps=4)
    with pytest.raises(NanoLladaError, match="at least one token"):
        diffusion_generate(shifted, torch.zeros(1, 0, dtype=torch.long), sampler, MASK)
    with pytest.raises(NanoLladaError, match="at least one token"):
        diffusion_generate(shifted, torch.tensor([[0, 0], [5, 6]]), sampler, MASK, prompt_lengths=torch.tensor([0, 2]))
