"""Checkpoint format, MiniMind2 import and parity, and the errors a user sees for a wrong file."""

import pytest
import torch

from model import NanoLladaError, Transformer, load_model, read_checkpoint, save_checkpoint
from model.checkpoint import atomic_save


def test_minimind2_fixture_parity(minimind2_fixtures):
    model, config = load_model(minimind2_fixtures / "minimind2_tiny.pth")
    expected = torch.load(minimind2_fixtures / "minimind2_tiny_expected.pt")
    with torch.no_grad():
        logits = model(expected["input_ids"])
    assert config.num_attention_heads == 8 and config.num_key_value_heads == 2 and config.vocab_size == 6401
    assert logits.shape == (*expected["input_ids"].shape, 6401)
    assert (logits[..., :6400] - expected["logits"]).abs().max() < 1e-4


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
