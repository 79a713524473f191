"""Fast-dLLM decoding for bidirectional models: prefix/dual caches, batched threshold decoding, per-row EOS stop."""

import pytest
import torch
import torch.nn as nn
from conftest import CommitLog, decodes_something, lively_model

from model.errors import NanoLladaError
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


class Recorder(nn.Module):
    """Wraps a model; keeps, for every call, the ids, their true positions, whether it started a fresh cache, and
    the logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, ids, attention="bidirectional", kv_cache=None, positions=None):
        past = kv_cache.length if kv_cache is not None else 0
        logits = self.inner(ids, attention=attention, kv_cache=kv_cache, positions=positions)
        where = positions if positions is not None else past + torch.arange(ids.shape[1])
        self.calls.append(
            {
                "ids": ids.clone(),
                "positions": where.clone(),
                "refresh": kv_cache is not None and past == 0,
                "logits": logits.clone(),
            }
        )
        return logits

    def new_kv_cache(self, batch_size, max_length):
        return self.inner.new_kv_cache(batch_size, max_length)


def setup(tiny_config, batch=2, prompt_len=5):
    torch.manual_seed(0)
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    return model, mask_id, torch.randint(1, mask_id, (batch, prompt_len), generator=rng())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_first_step_after_a_refresh_equals_the_uncached_forward(tiny_config, cache, cfg_scale):
    """A refresh forward sees the true canvas at true positions, so its logits are the uncached ones."""
    model, mask_id, prompt = setup(tiny_config)
    recorder = Recorder(model)
    sampler = DiffusionSamplerConfig(
        gen_length=12, steps=12, block_size=4, threshold=0.9, cache=cache, cfg_scale=cfg_scale, stop_at_eos=False
    )
    diffusion_generate(recorder, prompt, sampler, mask_id)
    refreshes = [c for c in recorder.calls if c["refresh"]]
    assert len(refreshes) == 3  # once per block
    for call in refreshes:
        canvas = torch.empty_like(call["ids"])
        canvas[:, call["positions"]] = call["ids"]  # undo the dual cache's [prefix, suffix, block] order
        uncached = model(canvas, attention="bidirectional")[:, call["positions"]]
        assert torch.allclose(call["logits"], uncached, atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(
    "options",
    [
        {"threshold": 0.9},
        {"threshold": 0.02},
        {},
        {"cfg_scale": 1.0, "threshold": 0.9},
        {"temperature": 1.0, "remasking": "random"},
    ],
)
def test_cached_decoding_fills_every_mask_and_never_changes_prompt_or_committed_tokens(tiny_config, cache, options):
    model, mask_id, prompt = setup(tiny_config, batch=3)
    recorder = Recorder(model)
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, cache=cache, stop_at_eos=False, **options)
    out = diffusion_generate(recorder, prompt, sampler, mask_id, generator=rng(3))
    assert out.tokens.shape == (3, 12) and not (out.tokens == mask_id).any()
    assert out.nfe == len(recorder.calls) and torch.stack(out.commits).sum(0).tolist() == [12, 12, 12]
    final = torch.cat([prompt, out.tokens], 1)
    for call in recorder.calls:
        ids = call["ids"][:3]  # with CFG the second half is the prompt-hidden copy
        seen = ids != mask_id
        # every token the model is ever shown is already final: the prompt and committed tokens never change
        assert torch.equal(ids[seen], final[:, call["positions"]][seen])
        if not call["refresh"]:  # later steps feed block + suffix (prefix) or the block alone (dual)
            assert call["ids"].shape[1] == (4 if cache == "dual" else 17 - int(call["positions"][0]))


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_threshold_zero_decodes_each_block_in_its_refresh_step_so_caches_are_exact(tiny_config, cache, logit_shift):
    tiny_config.logit_shift = logit_shift
    model, mask_id, prompt = setup(tiny_config)
    uncached = diffusion_generate(
        model, prompt, DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, threshold=0.0), mask_id
    )
    cached = diffusion_generate(
        model,
        prompt,
        DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, threshold=0.0, cache=cache),
        mask_id,
    )
    assert torch.equal(uncached.tokens, cached.tokens) and cached.nfe == uncached.nfe == 3


def test_threshold_above_one_with_a_batch_equals_one_token_per_step_low_confidence(monkeypatch, tiny_config):
    """A threshold no confidence reaches commits one token per step (the most confident), as low-confidence
    remasking does, and batches do not change that (Fast-dLLM's issue #7: batches broke the original code)."""
    torch.manual_seed(0)
    model, mask_id, log = lively_model(tiny_config), tiny_config.vocab_size - 1, CommitLog(monkeypatch)
    prompt = torch.randint(1, mask_id, (3, 5), generator=rng())
    base = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, stop_at_eos=False)
    baseline, baseline_log = diffusion_generate(model, prompt, base, mask_id), log.take()
    fast = diffusion_generate(model, prompt, DiffusionSamplerConfig(**{**vars(base), "threshold": 1.5}), mask_id)
    assert torch.equal(baseline.tokens, fast.tokens) and fast.nfe == 8 and decodes_something(fast.tokens)
    assert all(torch.equal(a, b) for a, b in zip(baseline_log, log.take(), strict=True))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_batched_threshold_decoding_equals_each_row_alone(tiny_config, cache, logit_shift):
    tiny_config.logit_shift = logit_shift
    model, mask_id, prompt = setup(tiny_config, batch=3)
    sampler = DiffusionSamplerConfig(
        gen_length=12, steps=12, block_size=4, threshold=0.05, cache=cache, stop_at_eos=False
    )
    batched = diffusion_generate(model, prompt, sampler, mask_id).tokens
    alone = torch.cat([diffusion_generate(model, prompt[b : b + 1], sampler, mask_id).tokens for b in range(3)])
    assert torch.equal(batched, alone)


class FirstTokenModel(nn.Module):
    """Predicts each row's first prompt token everywhere, confidently: row 0 can be made to 'write EOS'."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.batch_sizes = vocab, []

    def forward(self, ids, attention="bidirectional", **_):
        self.batch_sizes.append(ids.shape[0])
        return torch.nn.functional.one_hot(ids[:, :1].expand(ids.shape), self.vocab).float() * 10


def test_a_row_that_wrote_eos_leaves_the_batch_and_is_padded_with_eos(tiny_config):
    mask_id, eos = tiny_config.vocab_size - 1, 11
    model = FirstTokenModel(tiny_config.vocab_size)
    prompt = torch.tensor([[eos, 3, 4], [12, 3, 4]])
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, threshold=0.9)
    out = diffusion_generate(model, prompt, sampler, mask_id, eos_id=eos)
    assert (out.tokens[0] == eos).all() and (out.tokens[1] == 12).all()
    assert model.batch_sizes == [2, 1, 1]  # one step per block; blocks 2 and 3 run on the row still writing
    assert torch.stack(out.commits).tolist() == [[4, 4], [0, 4], [0, 4]]
    both_end = diffusion_generate(model, torch.tensor([[eos, 3], [eos, 4]]), sampler, mask_id, eos_id=eos)
    assert both_end.nfe == 1 and (both_end.tokens == eos).all()


def test_cached_agreement_with_the_uncached_sampler_is_reported(tiny_config, capsys):
    """Prefix/dual caches are approximations for bidirectional models (the K/V outside the block go stale as it
    fills in): report agreement, do not assert it."""
    model, mask_id, prompt = setup(tiny_config, batch=4, prompt_len=8)
    base = DiffusionSamplerConfig(gen_length=32, steps=32, block_size=8, threshold=0.9, stop_at_eos=False)
    reference = diffusion_generate(model, prompt, base, mask_id)
    for cache in ("prefix", "dual"):
        out = diffusion_generate(model, prompt, DiffusionSamplerConfig(**{**vars(base), "cache": cache}), mask_id)
        rate = agreement(out.tokens, reference.tokens)
        assert 0.0 <= rate <= 1.0 and not (out.tokens == mask_id).any()
        with capsys.disabled():
            print(
                f"\n{cache} cache: {rate:.1%} of tokens agree with the uncached threshold sampler (random tiny model), "
                f"NFE {out.nfe} vs {reference.nfe}"
            )


def test_cache_option_errors_are_explained():
    with pytest.raises(NanoLladaError, match="cache must be none, prefix or dual"):
        DiffusionSamplerConfig(gen_length=8, steps=8, cache="full").validate()
    with pytest.raises(NanoLladaError, match="already caches"):
        DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, block_causal=True, cache="prefix").validate()


def test_sampler_errors_name_the_library_parameters_and_entry_points_reword_them():
    from model.errors import SettingError
    from scripts.common.cli import flag_names
    from scripts.common.serving.engine import REQUEST_FIELDS
    from scripts.eval import eval_diffusion

    few_steps = DiffusionSamplerConfig(gen_length=10, steps=3, block_size=2)
    with pytest.raises(SettingError) as caught:
        few_steps.validate()
    assert str(caught.value).startswith("steps 3 is fewer than the 5 blocks") and caught.value.param == "steps"
    assert caught.value.worded(REQUEST_FIELDS).startswith("steps 3")
    eval_diffusion.parse_args(["--checkpoint", "any.pt"])  # the command line whose flags the messages name
    with pytest.raises(NanoLladaError, match="^--steps 3 is fewer than the 5 blocks"), flag_names():
        few_steps.validate()
    with (
        pytest.raises(NanoLladaError, match="^--block-size 4 does not divide the generation length 10"),
        flag_names(),
    ):
        DiffusionSamplerConfig(gen_length=10, steps=10, block_size=4).validate()


def test_a_checkpoint_decodes_as_it_was_trained_unless_told_otherwise():
    from types import SimpleNamespace

    from model.inference.sampling import sampler_for_checkpoint

    asked = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, cache="dual")
    config = SimpleNamespace(prompt_causal=False)
    plain = SimpleNamespace(extra={}, config=config)
    blocks = SimpleNamespace(extra={"block_diffusion": {"block_size": 8}}, config=config)
    assert sampler_for_checkpoint(plain, asked) == asked
    prompt_causal = SimpleNamespace(extra={}, config=SimpleNamespace(prompt_causal=True))
    assert sampler_for_checkpoint(prompt_causal, asked).cache == "none"  # its prompt cache is exact
    trained = sampler_for_checkpoint(blocks, asked)
    assert trained.block_causal and trained.block_size == 8 and trained.cache == "none"  # its cache is exact
    assert sampler_for_checkpoint(blocks, asked, "bidirectional") == asked
    assert sampler_for_checkpoint(blocks, asked, block_size=2).block_size == 2
    assert sampler_for_checkpoint(plain, asked, "block-causal", block_size=2).block_causal
    with pytest.raises(NanoLladaError, match="not trained with block diffusion; give block_size"):
        sampler_for_checkpoint(plain, asked, "block-causal")
