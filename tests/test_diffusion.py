"""Invariants of the LLaDA objective, the diffusion sampler and the likelihood estimators."""

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from conftest import TINY_MODEL, CommitLog, UniformModel, decodes_something, lively_model

from model.config import ModelConfig
from model.errors import NanoLladaError
from model.inference.likelihood import conditional_log_likelihood, diffusion_nelbo
from model.inference.reference_sampler import combine_guidance, with_unconditional
from model.inference.reference_sampler import sample_tokens as _sampled_tokens
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.objectives.schedule import LINEAR, NoiseSchedule
from model.transformer import Transformer

V, MASK = 101, 100


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", [LINEAR, NoiseSchedule("cosine")])
def test_uniform_logits_give_expected_loss_ln_v(schedule):
    model, gen = UniformModel(), rng()
    ids = torch.randint(1, MASK, (64, 256), generator=gen)
    nelbo, stderr = diffusion_nelbo(model, ids[:16], MASK, num_samples=200, generator=gen, schedule=schedule)
    assert nelbo == pytest.approx(math.log(V), abs=4 * stderr + 1e-3)  # unbiased under either schedule


def test_step_quotas_follow_the_linear_schedule():
    quotas = LINEAR.step_quotas(torch.tensor([10, 7, 3, 0]), 4)
    assert quotas.sum(1).tolist() == [10, 7, 3, 0]
    assert (quotas.max(1).values - quotas.min(1).values <= 1).all()
    assert (quotas.diff(dim=1) <= 0).all()  # larger quotas first


def test_step_quotas_of_the_cosine_schedule_follow_its_clean_probability():
    # 10 tokens over 4 steps at t = 1, 3/4, 1/2, 1/4, 0: alpha = 0, 0.146, 0.5, 0.854, 1, so 10 alpha rounds to
    # 0, 1, 5, 9, 10 tokens decided: few at both ends, most in the middle
    quotas = NoiseSchedule("cosine").step_quotas(torch.tensor([10, 0, 12]), 4)
    assert quotas[:2].tolist() == [[1, 4, 4, 1], [0, 0, 0, 0]] and quotas[2].sum() == 12


class Recorder(nn.Module):
    """Wraps a model and keeps every canvas it was called on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.canvases = inner, []

    def forward(self, ids, attention="bidirectional"):
        self.canvases.append(ids.clone())
        return self.inner(ids, attention=attention)


@pytest.mark.parametrize(
    "block_size,steps,schedule",
    [
        (None, 12, LINEAR),
        (4, 12, LINEAR),
        (6, 6, LINEAR),
        (None, 12, NoiseSchedule("cosine")),
        (6, 8, NoiseSchedule("cosine")),
    ],
)
def test_sampler_keeps_prompt_fills_every_mask_and_follows_the_schedule(tiny_config, block_size, steps, schedule):
    model = Recorder(Transformer(tiny_config).eval())
    mask_id = tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (2, 5), generator=rng())
    sampler = DiffusionSamplerConfig(12, steps, block_size, schedule=schedule, stop_at_eos=False)
    out = diffusion_generate(model, prompt, sampler, mask_id)
    assert out.tokens.shape == (2, 12) and not (out.tokens == mask_id).any()
    block_size = block_size or 12  # None: the whole generation is one block
    per_block = steps // (12 // block_size)
    expected = schedule.step_quotas(torch.tensor([block_size, block_size]), per_block).T.repeat(12 // block_size, 1)
    expected = expected[expected.any(1)]  # a step that commits nothing runs no forward pass
    assert torch.equal(torch.stack(out.commits), expected)
    assert out.nfe == len(expected) == len(model.canvases) and (schedule != LINEAR or out.nfe == steps)
    for before, after in zip(model.canvases, model.canvases[1:] + [torch.cat([prompt, out.tokens], 1)]):
        assert torch.equal(after[:, :5], prompt)  # the prompt never changes
        decided = before != mask_id
        assert torch.equal(after[decided], before[decided])  # committed tokens never change
        first_open = (before[:, 5:] == mask_id).float().argmax(1)
        changed = (after != before)[:, 5:]
        block_of_first_open = first_open // block_size  # blocks decode in order: nothing changes before it
        assert all((changed[b].nonzero() // block_size >= block_of_first_open[b]).all() for b in range(2))


def test_temperature_zero_is_deterministic_and_random_sampling_is_seeded(tiny_config):
    torch.manual_seed(0)
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    prompt = torch.tensor([[1, 7, 9]])
    greedy = DiffusionSamplerConfig(gen_length=8, steps=8)
    assert torch.equal(
        diffusion_generate(model, prompt, greedy, mask_id).tokens,
        diffusion_generate(model, prompt, greedy, mask_id).tokens,
    )
    hot = DiffusionSamplerConfig(gen_length=8, steps=8, temperature=1.0, remasking="random")
    a = diffusion_generate(model, prompt, hot, mask_id, generator=rng(5)).tokens
    assert torch.equal(a, diffusion_generate(model, prompt, hot, mask_id, generator=rng(5)).tokens)


def _guided_logits(model, canvas: torch.Tensor, prompt_len: int, mask_id: int, cfg_scale: float) -> torch.Tensor:
    """One guided prediction as every sampler makes it: [conditional; unconditional] in one call, then mixed."""
    rows = with_unconditional(canvas, 0, prompt_len, mask_id, cfg_scale != 0)
    return combine_guidance(model(rows, attention="bidirectional"), cfg_scale)


def test_cfg_scale_zero_equals_no_guidance_and_guidance_changes_logits(tiny_config):

    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    canvas = torch.tensor([[1, 7, 9, mask_id, mask_id]])
    plain = model(canvas, attention="bidirectional")
    assert torch.equal(_guided_logits(model, canvas, 3, mask_id, 0.0), plain)
    guided = _guided_logits(model, canvas, 3, mask_id, 1e-9)
    assert torch.allclose(guided, plain, atol=1e-5)  # the CFG branch itself reduces to the plain logits at w -> 0
    assert not torch.allclose(_guided_logits(model, canvas, 3, mask_id, 2.0), plain, atol=1e-3)


def test_guidance_is_the_unconditional_plus_w_plus_one_times_the_difference(tiny_config):
    """LLaDA's unsupervised CFG, written out: u + (w + 1)(c - u), u the logits with the prompt masked."""
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    canvas = torch.tensor([[1, 7, 9, mask_id, mask_id]])
    free = canvas.clone()
    free[:, :3] = mask_id
    c, u = model(canvas, attention="bidirectional"), model(free, attention="bidirectional")
    assert torch.allclose(_guided_logits(model, canvas, 3, mask_id, 2.0), u + 3.0 * (c - u), atol=1e-5)


def test_threshold_above_one_equals_one_token_per_step_low_confidence(monkeypatch, tiny_config):
    """No confidence reaches the threshold, so each step commits its single most confident position: step by step
    what low-confidence remasking with one token per step does, on a model whose text varies."""
    torch.manual_seed(0)
    model, mask_id, log = lively_model(tiny_config), tiny_config.vocab_size - 1, CommitLog(monkeypatch)
    prompt = torch.tensor([[1, 7, 9, 4]])
    base = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, stop_at_eos=False)
    baseline, baseline_log = diffusion_generate(model, prompt, base, mask_id), log.take()
    fast = diffusion_generate(model, prompt, replace(base, threshold=1.5), mask_id)
    assert torch.equal(baseline.tokens, fast.tokens) and fast.nfe == 8 and decodes_something(fast.tokens)
    assert all(torch.equal(a, b) for a, b in zip(baseline_log, log.take(), strict=True))
    one_shot = diffusion_generate(
        model, prompt, DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, threshold=0.0), mask_id
    )
    assert one_shot.nfe == 2  # threshold 0: each block in one step


def test_eos_stop_and_strip(tiny_config):
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    prompt = torch.tensor([[1, 7, 9]])
    free = diffusion_generate(
        model, prompt, DiffusionSamplerConfig(gen_length=8, steps=8, block_size=2, stop_at_eos=False), mask_id
    )
    eos = int(free.tokens[0, 0])  # pretend the first generated token is EOS
    stopped = diffusion_generate(
        model, prompt, DiffusionSamplerConfig(gen_length=8, steps=8, block_size=2), mask_id, eos_id=eos
    )
    assert stopped.nfe == 2 and (stopped.tokens[0, 2:] == eos).all()
    assert strip_after_eos([4, 5, 2, 2], 2) == [4, 5] and strip_after_eos([4, 5], 2) == [4, 5]


def test_sampler_config_errors_are_explained():
    with pytest.raises(NanoLladaError, match="does not divide the generation length 10"):
        DiffusionSamplerConfig(gen_length=10, steps=10, block_size=4).validate()
    with pytest.raises(NanoLladaError, match="fewer than the 5 blocks"):
        DiffusionSamplerConfig(gen_length=10, steps=3, block_size=2).validate()


def test_conditional_likelihood_is_exact_for_one_token_and_minus_a_ln_v_for_uniform(tiny_config):
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    prompt, answer = [1, 5, 6, 7], [9]
    estimate, stderr = conditional_log_likelihood(model, prompt, answer, mask_id, num_samples=64)
    logits = model(torch.tensor([prompt + [mask_id]]), attention="bidirectional")
    assert estimate == pytest.approx(torch.log_softmax(logits[0, -1], -1)[9].item(), abs=1e-5) and stderr == 0
    uniform, _ = conditional_log_likelihood(
        UniformModel(tiny_config.vocab_size), prompt, [3, 4, 5], mask_id, num_samples=10
    )
    assert uniform == pytest.approx(-3 * math.log(tiny_config.vocab_size), rel=1e-6)
    a = conditional_log_likelihood(model, prompt, [3, 4, 5], mask_id, 16, generator=rng(1))
    assert a == conditional_log_likelihood(model, prompt, [3, 4, 5], mask_id, 16, generator=rng(1))


def test_one_nelbo_draw_has_no_standard_error_and_raises_no_warning():
    ids = torch.randint(1, MASK, (2, 32), generator=rng())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on the std of a single value; that is never computed
        nelbo, stderr = diffusion_nelbo(UniformModel(), ids, MASK, num_samples=1, generator=rng())
    assert math.isfinite(nelbo) and math.isnan(stderr)


def test_gumbel_max_sampling_draws_from_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    draws = _sampled_tokens(logits, temperature=1.0, generator=rng())
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(frequencies, logits[0].double().softmax(-1), atol=0.03)


def test_guidance_hides_the_whole_prompt_from_the_unconditional_rows():
    model, canvas = UniformModel(), torch.randint(0, MASK, (2, 12), generator=rng())
    _guided_logits(model, canvas, prompt_len=5, mask_id=MASK, cfg_scale=1.5)
    (rows,) = model.inputs  # one batched call: [conditional; unconditional]
    assert torch.equal(rows[:2], canvas) and torch.equal(rows[2:, 5:], canvas[:, 5:]) and (rows[2:, :5] == MASK).all()


def test_uneven_step_quotas_are_followed_step_by_step(tiny_config):
    # 12 masks over 5 steps: 3, 3, 2, 2, 2 (larger quotas first); committing the first quota again would take 4 steps.
    mask_id = tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (2, 5), generator=rng())
    sampler = DiffusionSamplerConfig(gen_length=12, steps=5, stop_at_eos=False)
    out = diffusion_generate(Transformer(tiny_config).eval(), prompt, sampler, mask_id)
    assert out.nfe == 5 and [c.tolist() for c in out.commits] == [[3, 3], [3, 3], [2, 2], [2, 2], [2, 2]]


def test_a_generation_may_fill_the_models_positions_exactly_but_not_one_more():
    config = ModelConfig(**TINY_MODEL, vocab_size=V, max_position_embeddings=17)
    model, prompt = Transformer(config).eval(), torch.randint(1, MASK, (1, 5), generator=rng())
    out = diffusion_generate(model, prompt, DiffusionSamplerConfig(gen_length=12, steps=4, stop_at_eos=False), MASK)
    assert out.tokens.shape == (1, 12)  # 5 + 12 = 17 positions: the model's limit, allowed
    with pytest.raises(NanoLladaError, match="exceeds the model's 17 positions"):
        diffusion_generate(model, prompt, DiffusionSamplerConfig(gen_length=13, steps=13, stop_at_eos=False), MASK)
