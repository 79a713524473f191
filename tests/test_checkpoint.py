"""Checkpoint format, MiniMind2 import and parity, and the errors a user sees for a wrong file."""

import dataclasses

import pytest
import torch
from conftest import lively_model, reference_minimind2_forward

from model import NanoLladaError, Transformer, load_model, read_checkpoint, save_checkpoint
from model.checkpoint import atomic_save
from model.config import ModelConfig, preset
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.logit_shift import is_shifted


def test_minimind2_fixture_parity(minimind2_fixtures):
    model, config = load_model(minimind2_fixtures / "minimind2_tiny.pth")
    expected = torch.load(minimind2_fixtures / "minimind2_tiny_expected.pt")
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert config.num_attention_heads == 8 and config.num_key_value_heads == 2 and config.vocab_size == 6401
    assert logits.shape == (*expected["input_ids"].shape, 6401)
    assert (logits[..., :6400] - expected["logits"]).abs().max() < 1e-4


def test_a_minimind2_format_file_loads_with_minimind2_logits(tmp_path):
    """The parity check that runs without the shared fixture: a random state dict in MiniMind2's key layout and
    shapes (vocabulary 6400, no mask row, head tied), loaded by load_model, gives the logits of a plain MiniMind2
    forward over the same tensors."""
    reference = ModelConfig(
        hidden_size=128, num_hidden_layers=2, num_key_value_heads=2, vocab_size=6400, intermediate_size=384
    )
    generator = torch.Generator().manual_seed(0)
    state = {k: v for k, v in Transformer(reference).state_dict().items() if k != "lm_head.weight"}
    for name, tensor in state.items():
        noise = torch.randn(tensor.shape, generator=generator)
        state[name] = 1 + 0.3 * noise if "norm" in name else 0.1 * noise  # norms must matter
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:6400]
    torch.save(state, tmp_path / "random_minimind2.pth")
    model, config = load_model(tmp_path / "random_minimind2.pth")
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (8, 2, 6401)
    ids = torch.randint(0, 6400, (2, 24), generator=generator)
    with torch.no_grad():
        logits = model(ids)[..., :6400]
    assert (logits - reference_minimind2_forward(state, reference, ids)).abs().max() < 1e-4


def test_minimind2_fp16_file_loads_and_head_count_can_be_passed(minimind2_fixtures, tmp_path):
    state = torch.load(minimind2_fixtures / "minimind2_tiny.pth")
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "fp16.pth")
    model, config = load_model(tmp_path / "fp16.pth")
    assert next(model.parameters()).dtype == torch.float32
    _, config4 = load_model(tmp_path / "fp16.pth", num_attention_heads=4)
    assert (config4.num_attention_heads, config4.num_key_value_heads) == (4, 1)  # kv heads follow from head_dim


def test_mask_row_is_added_and_embedding_stays_tied(minimind2_fixtures):
    model, _ = load_model(minimind2_fixtures / "minimind2_tiny.pth")
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed
    assert torch.allclose(embed[6400], embed[:6400].mean(0))


def test_round_trip_keeps_config_kind_and_every_tensor(tiny_config, tmp_path):
    model = Transformer(tiny_config)
    save_checkpoint(tmp_path / "m.pt", "diffusion", tiny_config, model, {"vocab_size": 101, "sha256": "x"}, step=7)
    checkpoint = read_checkpoint(tmp_path / "m.pt")
    assert checkpoint.kind == "diffusion" and checkpoint.config == tiny_config and checkpoint.extra["step"] == 7
    assert set(checkpoint.state_dict) == set(model.state_dict())
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(NanoLladaError, match="is a diffusion checkpoint, expected ar"):
        load_model(tmp_path / "m.pt", kind="ar")
    with pytest.raises(NanoLladaError, match="stores 4 attention heads"):
        load_model(tmp_path / "m.pt", num_attention_heads=8)


def test_checkpoint_without_the_shift_field_loads_unshifted_and_decodes_as_before(tiny_config, tmp_path):
    model = lively_model(tiny_config)
    save_checkpoint(tmp_path / "new.pt", "diffusion", tiny_config, model, None)
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    del payload["config"]["logit_shift"]  # as written before the field existed
    torch.save(payload, tmp_path / "old.pt")

    old, old_config = load_model(tmp_path / "old.pt", kind="diffusion")
    new, new_config = load_model(tmp_path / "new.pt", kind="diffusion")
    assert old_config.logit_shift is False and not is_shifted(old) and old_config == new_config
    prompt = torch.randint(0, 100, (2, 6))
    sampler = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4)
    tokens = [diffusion_generate(m, prompt, sampler, mask_id=100).tokens for m in (old, new, model)]
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    assert len(set(tokens[0].flatten().tolist())) > 2  # a decode that varies, so equal tokens mean something


def test_shifted_checkpoint_loads_shifted(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, logit_shift=True)
    save_checkpoint(tmp_path / "shifted.pt", "diffusion", config, Transformer(config), None)
    assert read_checkpoint(tmp_path / "shifted.pt").config.logit_shift is True
    model, loaded = load_model(tmp_path / "shifted.pt", kind="diffusion")
    assert loaded == config and is_shifted(model)


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.pt"
    atomic_save({"a": 1}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, target)
    assert torch.load(target) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "checkpoint not found"),
        (b"not a checkpoint", "not a readable PyTorch checkpoint"),
        ({"something": torch.zeros(1)}, "neither a nano-llada checkpoint nor a MiniMind2"),
        (b"", "empty file"),
        (b"\x80", "not a readable PyTorch checkpoint"),  # an error whose message is empty
        ({"format": "nano-llada", "kind": "ar", "model": {}}, "damaged nano-llada checkpoint .has no config"),
        ({"format": "nano-llada", "kind": "vision", "config": {}, "model": {}}, "unknown kind 'vision'"),
    ],
)
def test_bad_checkpoint_files_give_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(NanoLladaError, match=match):
        read_checkpoint(path)


@pytest.mark.parametrize("lm_head", ["tied", "missing", "untied"])
def test_a_minimind2_state_dict_gains_the_mask_row_and_keeps_its_logits(tmp_path, lm_head):
    # Fixture-free: a MiniMind2-shaped state dict (no config, 100 rows, no <|mask|> row, no padding) from a tiny model.
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    source = lively_model(ModelConfig(**shape, vocab_size=100, pad_vocab_multiple=1, tie_word_embeddings=False))
    state = dict(source.state_dict())
    if lm_head == "tied":
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        source.lm_head.weight.data.copy_(state["lm_head.weight"])
    elif lm_head == "missing":
        del state["lm_head.weight"]
        source.lm_head.weight.data.copy_(state["model.embed_tokens.weight"])
    torch.save(state, tmp_path / "minimind2.pth")
    model, config = load_model(tmp_path / "minimind2.pth", num_attention_heads=4)
    assert config.vocab_size == 101 and config.padded_vocab_size == 128
    assert config.tie_word_embeddings == (lm_head != "untied")
    embed = model.model.embed_tokens.weight
    assert torch.allclose(embed[100], embed[:100].mean(0)) and not embed[101:].any()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids, "causal")[..., :100], source(ids, "causal"), atol=1e-5)


def test_the_default_shape_is_minimind2_smalls_published_config():
    """The defaults are MiniMind2-Small's, so its weights and tokenizer drop in (its config.json: hidden 512, 8
    layers, 8 heads, 2 KV heads, vocabulary 6400, intermediate 1408, RoPE theta 1e6, RMSNorm eps 1e-5, 32768
    positions, tied embeddings); nano-llada adds one row, <|mask|>."""
    config = preset("minimind2_small")
    published = dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )
    assert {name: getattr(config, name) for name in published} == published and config.vocab_size == 6400 + 1
    assert config == ModelConfig()


def test_the_small_preset_is_the_quickstarts_model():
    """The quickstart and the CPU experiments train the "small" preset (as shape flags): 1.61M parameters with the
    repository's vocabulary, the figure its logs print."""
    from scripts.common.pipeline import SMALL_MODEL

    assert SMALL_MODEL == dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    assert preset("small", vocab_size=6401).num_parameters() == 1_614_976
