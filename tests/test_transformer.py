"""Invariants of the one transformer: attention modes, KV cache, GQA grouping, shapes."""

import pytest
import torch
from conftest import decodes_something, lively_model, reference_minimind2_forward

from model.config import ModelConfig
from model.inference.ar import ARSamplerConfig, generate
from model.transformer import Transformer, rope_frequencies


def test_causal_ignores_future_tokens_and_bidirectional_does_not(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        causal_a, causal_b = model(ids, "causal"), model(changed, "causal")
        bi_a, bi_b = model(ids, "bidirectional"), model(changed, "bidirectional")
    assert torch.allclose(causal_a[:, :8], causal_b[:, :8], atol=1e-6)
    assert not torch.allclose(causal_a[:, 8:], causal_b[:, 8:], atol=1e-3)
    assert not torch.allclose(bi_a[:, :8], bi_b[:, :8], atol=1e-3)


def test_explicit_mask_matches_the_named_modes(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    lower = torch.ones(10, 10, dtype=torch.bool).tril()
    with torch.no_grad():
        assert torch.allclose(model(ids, lower), model(ids, "causal"), atol=1e-5)
        assert torch.allclose(model(ids, torch.ones(10, 10, dtype=torch.bool)), model(ids, "bidirectional"), atol=1e-5)


def test_kv_cache_chunks_equal_one_full_forward(tiny_config):
    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 15))
    cache = model.new_kv_cache(2, 15)
    with torch.no_grad():
        full = model(ids, "causal")
        pieces = [
            model(ids[:, :6], "causal", kv_cache=cache),
            model(ids[:, 6:7], "causal", kv_cache=cache),
            model(ids[:, 7:15], "causal", kv_cache=cache),
        ]
    assert cache.length == 15
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_kv_cached_greedy_decoding_equals_uncached(tiny_config):
    """On a model whose greedy text varies, and with the cache really used: after the prompt, one token per forward."""
    torch.manual_seed(0)
    model = lively_model(tiny_config)
    fed = []
    model.register_forward_hook(lambda module, args, output: fed.append(args[0].shape[1]))
    prompt = [1, 5, 9, 3]
    cached = list(generate(model, prompt, 20, use_cache=True))
    assert fed == [len(prompt)] + [1] * 19
    uncached = list(generate(model, prompt, 20, use_cache=False))
    assert len(cached) == 20 and decodes_something(cached)
    assert cached == uncached


def test_generation_never_samples_banned_ids_and_stops_at_eos(tiny_config):
    model = Transformer(tiny_config).eval()
    with torch.no_grad():
        model.lm_head.weight[7] += 5.0  # make token 7 attractive, then ban it
    sampler = ARSamplerConfig(temperature=1.0, banned_ids=(7,))
    tokens = list(generate(model, [1, 2], 30, sampler, generator=torch.Generator().manual_seed(0)))
    assert 7 not in tokens
    first = list(generate(model, [1, 2], 30))[0]  # greedy by default
    assert list(generate(model, [1, 2], 30, eos_id=first)) == [first]


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1), (8, 8), (16, 4)])
def test_gqa_grouping_matches_a_plain_reference_for_any_head_count(heads, kv_heads):
    config = ModelConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=300,
        max_position_embeddings=64,
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.3)  # norms must matter
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(
            model(ids), reference_minimind2_forward(state, config, ids)[..., : config.vocab_size], atol=1e-4
        )


def test_parameter_count_and_intermediate_size_follow_minimind2():
    config = ModelConfig()  # MiniMind2-Small
    assert config.intermediate_size == 1408 and config.head_dim == 64 and config.vocab_size == 6401
    assert Transformer(config).num_parameters() == config.num_parameters()
    assert 25.5e6 < config.num_parameters() < 26.5e6  # MiniMind2-Small is "26M"


def test_yarn_is_off_by_default_and_only_rescales_when_asked():
    plain = rope_frequencies(ModelConfig())
    yarn = rope_frequencies(ModelConfig(inference_rope_scaling=True))
    theta = 1.0 / (1e6 ** (torch.arange(0, 64, 2).double() / 64))
    assert torch.allclose(plain, theta.float())
    assert torch.allclose(yarn[-1], plain[-1] / 16)  # longest wavelengths are interpolated by the factor
    assert (yarn <= plain + 1e-12).all() and (yarn < plain).any()


def test_bad_configs_raise_clear_errors():
    from model.errors import NanoLladaError

    with pytest.raises(NanoLladaError, match="not divisible"):
        ModelConfig(hidden_size=100, num_attention_heads=8)
    with pytest.raises(NanoLladaError, match="key/value heads"):
        ModelConfig(num_attention_heads=8, num_key_value_heads=3)


@pytest.mark.filterwarnings("ignore")
def test_flex_attention_path_equals_sdpa_for_document_and_block_masks(tiny_config):
    pytest.importorskip("torch.nn.attention.flex_attention")
    from model.block_attention import bd3lm_attention_mask

    model = Transformer(tiny_config).eval()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 24))
    doc = torch.tensor([[0] * 10 + [1] * 14, [0] * 5 + [1] * 19])
    same_doc = (doc[:, :, None] == doc[:, None, :])[:, None]
    two_l = bd3lm_attention_mask(12, 4)  # the [noisy; clean] block-diffusion mask over 2 x 12 positions
    positions = torch.arange(12).repeat(2)
    with torch.no_grad():
        dense = [model(ids, same_doc), model(ids, two_l, positions=positions)]
        model.flex_on_cpu = True  # the CUDA path, run eagerly on the CPU
        flex = [model(ids, same_doc), model(ids, two_l, positions=positions)]
    assert model.flex_attention  # it did not fall back
    for a, b in zip(dense, flex):
        assert torch.allclose(a, b, atol=1e-5)


def test_vocabulary_padding_rows_are_never_scored_sampled_or_trained(tiny_config):
    """The embedding and head have padded_vocab_size rows (a multiple of 64, for the matmul kernels); the
    extra rows stay exactly zero through training and no logit exists for them."""
    from model.inference.ar import generate
    from model.objectives.ar_loss import next_token_loss
    from model.objectives.diffusion_loss import diffusion_loss
    from scripts.common.training.optimization import TrainConfig, make_optimizer

    model = Transformer(tiny_config)
    V, padded = tiny_config.vocab_size, tiny_config.padded_vocab_size
    assert padded % 64 == 0 and padded > V and model.model.embed_tokens.weight.shape[0] == padded
    optimizer = make_optimizer(
        model, TrainConfig(run_name="t", kind="ar", max_steps=1, learning_rate=1e-2), torch.device("cpu")
    )
    ids = torch.randint(1, V - 1, (2, 16))
    for _ in range(3):
        loss = next_token_loss(model, ids) + diffusion_loss(model, ids, torch.Generator().manual_seed(0), V - 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(ids).shape[-1] == V
    assert (
        torch.count_nonzero(model.model.embed_tokens.weight[V:]) == 0
        and torch.count_nonzero(model.lm_head.weight[V:]) == 0
    )
    hot = ARSamplerConfig(temperature=5.0)
    assert max(generate(model, [1, 2, 3], 20, hot, generator=torch.Generator().manual_seed(0))) < V


def test_sampling_with_top_k_zero_draws_from_the_whole_vocabulary():
    # top_k = 0 turns top-k filtering off: every token keeps its softmax probability.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    draws = ARSamplerConfig(temperature=1.0, top_k=0).draw(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, logits[0].softmax(-1), atol=0.03)


def test_yarn_divides_the_longest_wavelength_by_the_default_factor_of_16():
    # As ratios: the longest pair's frequency is ~1e-6, under allclose's absolute tolerance, so a difference of
    # the frequencies themselves cannot tell a factor of 16 from 17.
    plain = rope_frequencies(ModelConfig())
    yarn = rope_frequencies(ModelConfig(inference_rope_scaling=True))
    assert (plain[-1] / yarn[-1]).item() == pytest.approx(16.0, rel=1e-6)
    assert (plain[0] / yarn[0]).item() == pytest.approx(1.0, rel=1e-6)  # beta = 1 at the shortest: not interpolated
