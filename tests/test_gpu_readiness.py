"""What the first GPU run depends on, checked on the CPU: the FlexAttention and torch.compile fallbacks (and no
probe without explicit masks), SDPA's grouped heads under a mask, block diffusion's head over the needed outputs
only, the cached block mask, static compiled shapes across the block curriculum, crops that agree across ranks in
a few lengths, no silent CPU run beside an unusable GPU, TF32, and the chunked cross-entropy."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_TRAINING
from conftest import TINY_MASK_ID as MASK_ID
from conftest import token_rows as rows

from model import block_attention
from model.block_attention import bd3lm_attention_mask, bdlm_forward, choose_flex
from model.config import preset
from model.cross_entropy import chunked_cross_entropy, fp32_cross_entropy, logits_or_nll
from model.errors import NanoLladaError
from model.logit_shift import read_shifted
from model.objectives.block_curriculum import BlockCurriculum
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.masking import crop_lengths
from model.transformer import SelfAttention, Transformer, apply_rope, block_mask_from_dense
from scripts.common import device as device_habits
from scripts.common.cli import pick_device
from scripts.common.training.diffusion_pretraining import DiffusionSettings, PretrainingLoss
from scripts.common.training.optimization import TrainConfig
from scripts.common.training.trainer import RunOptions, Task, train
from scripts.memory_estimate import step_memory
from scripts.train import train_pretrain

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Every test here compiles: each starts and ends with Dynamo's caches empty."""


def diffusion_run(tmp_path, config, loss: PretrainingLoss, steps: int, explicit_masks=True, **cfg_options):
    """A diffusion run of the shared trainer on the CPU; returns (summary, per-step losses)."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.flex_on_cpu = cfg_options.pop("flex_on_cpu", False)
    options = {**TINY_TRAINING, "eval_interval": 5, **cfg_options}
    cfg = TrainConfig("run", "diffusion", max_steps=steps, out_dir=str(tmp_path), **options)
    task = Task(rows, [rows(-1), rows(-2)], loss.train, loss.validation, explicit_masks=explicit_masks)
    summary = train(model, cfg, task, RunOptions({"vocab_size": 101, "sha256": "t"}), CPU)
    metrics = [json.loads(line) for line in (tmp_path / "run_metrics.jsonl").read_text().splitlines()]
    return model, summary, [m["loss"] for m in metrics if "loss" in m]


def pretraining_loss(block_size=None, curriculum=None, crop=0.0) -> PretrainingLoss:
    settings = DiffusionSettings(time_weight_schedule="linear", block_size=block_size, variable_length_prob=crop)
    return PretrainingLoss(settings, 42, curriculum, MASK_ID)


# ----------------------------------------------------------------------------- FlexAttention, chosen once


def test_failed_flex_probe_falls_back_to_sdpa_in_one_line_and_training_goes_on(tmp_path, tiny_config, capsys):
    # flex_on_cpu sends the block masks to FlexAttention, which has no CPU backward: the real probe fails here as a
    # broken kernel would on a GPU, before the first step.
    model, summary, losses = diffusion_run(tmp_path, tiny_config, pretraining_loss(4), 4, flex_on_cpu=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]
    assert len(lines) == 1 and lines[0].startswith("attention: SDPA for explicit masks (FlexAttention failed")
    assert not model.flex_attention and summary["step"] == 4 and all(math.isfinite(x) for x in losses)


def test_a_run_without_explicit_masks_is_not_probed(tmp_path, tiny_config, capsys):
    # flex_on_cpu makes the probe run (and fail) on the CPU, as it would compile on a GPU: MDLM passes no mask.
    model, summary, _ = diffusion_run(tmp_path, tiny_config, pretraining_loss(), 2, False, flex_on_cpu=True)
    assert summary["step"] == 2 and model.flex_attention
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]


def test_flex_errors_in_the_forward_are_not_swallowed(tiny_config):
    model = Transformer(tiny_config)
    model.flex_on_cpu = True  # chosen without a probe: the forward's own error must surface, not switch kernels
    ids = rows(0)
    with pytest.raises(NotImplementedError):
        bdlm_forward(model, ids.masked_fill(ids > 50, MASK_ID), ids, 4).sum().backward()
    assert model.flex_attention


def test_a_passing_probe_keeps_flex_and_out_of_memory_is_not_a_fallback(tiny_config):
    model, said = Transformer(tiny_config), []
    model.flex_on_cpu = True
    assert choose_flex(model, CPU, probe=lambda m, d: None, say=said.append) and model.flex_attention
    assert said == ["attention: FlexAttention for explicit masks (its forward and backward probe passed)"]

    def out_of_memory(m, d):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        choose_flex(model, CPU, probe=out_of_memory, say=said.append)
    plain = Transformer(tiny_config)  # CPU training runs SDPA: nothing is probed or said
    assert not choose_flex(plain, CPU, probe=out_of_memory, say=said.append) and len(said) == 1


# ----------------------------------------------------------------------------- torch.compile, and its way out


@torch._dynamo.register_backend(name="broken_for_tests")
def _broken_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_failed_compile_warns_once_naming_no_compile_and_trains_the_same_losses_eagerly(tmp_path, tiny_config, capsys):
    loss = pretraining_loss(4)
    _, _, eager = diffusion_run(tmp_path / "eager", tiny_config, loss, 4)
    capsys.readouterr()
    _, summary, fallback = diffusion_run(
        tmp_path / "broken", tiny_config, loss, 4, compile=True, compile_backend="broken_for_tests"
    )
    warnings = [line for line in capsys.readouterr().out.splitlines() if "torch.compile failed" in line]
    assert len(warnings) == 1 and "--no-compile" in warnings[0] and summary["step"] == 4
    assert fallback == eager  # the failed first call left nothing behind (gradients included)


def test_compiled_training_compiles_once_per_distinct_shape_across_the_block_curriculum(tmp_path, tiny_config):
    # Warmup BDLM on [x_t ; x_0] (32 tokens), stable MDLM (16), decay BDLM again (32), evaluations (16, no grad).
    curriculum = BlockCurriculum(16, 10, (2, 4), (8,), (0.3, 0.5, 0.2))
    assert {curriculum.at(s)[0] for s in range(10)} == {"warmup", "stable", "decay"}
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss = pretraining_loss(curriculum=curriculum)
    _, _, compiled = diffusion_run(tmp_path / "c", tiny_config, loss, 10, compile=True, compile_backend="eager")
    assert counters["stats"]["unique_graphs"] == 3  # evaluation, BDLM training, MDLM training: no more
    _, _, eager = diffusion_run(tmp_path / "e", tiny_config, loss, 10)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)


@pytest.mark.parametrize("block_size", [None, 4])
def test_two_ranks_crop_the_same_steps_to_the_same_few_lengths(tiny_config, block_size):
    # Ranks draw their masks from generators seeded with their rank (trainer._train_rng); the crop must not follow.
    model, lengths = Transformer(tiny_config), {0: [], 1: []}
    loss = pretraining_loss(block_size, crop=0.5)
    for rank in (0, 1):
        hook = model.register_forward_pre_hook(lambda m, args, rank=rank: lengths[rank].append(args[0].shape[1]))
        for step in range(40):
            with torch.no_grad():
                loss.train(model, rows(step), torch.Generator().manual_seed(1000 * rank + step), step)
        hook.remove()
    assert lengths[0] == lengths[1]
    full = 32 if block_size else 16  # block diffusion feeds [x_t ; x_0]
    crops = {n for n in lengths[0] if n < full}
    assert 1 <= len(crops) <= len(crop_lengths(16, block_size or 1)) - 1 == 3  # a few lengths, not up to 16
    assert all(n % (2 * block_size if block_size else 1) == 0 for n in crops)


def test_a_run_that_crops_compiles_a_graph_per_crop_bucket_at_most(tmp_path, tiny_config):
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, summary, losses = diffusion_run(
        tmp_path, tiny_config, pretraining_loss(crop=0.5), 12, compile=True, compile_backend="eager"
    )
    # evaluation, the full row and at most 3 crop lengths: within Dynamo's 8, every step stays compiled
    assert summary["step"] == 12 and 2 <= counters["stats"]["unique_graphs"] <= 5 and all(map(math.isfinite, losses))


# ----------------------------------------------------------------------------- no silent CPU


def test_an_nvidia_gpu_that_cuda_cannot_use_stops_training_in_one_line_unless_cpu_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_habits, "nvidia_device_present", lambda: True)
    monkeypatch.setattr(device_habits, "nvidia_driver_version", lambda: "535.104.05")
    argv = ["--data", str(tmp_path / "none.jsonl"), "--tokenizer-dir", str(ROOT), "--save-dir", str(tmp_path)]
    with pytest.raises(NanoLladaError) as refused:
        train_pretrain.main(argv)
    message = str(refused.value)
    assert "\n" not in message and "driver is 535.104.05" in message and f"CUDA {torch.version.cuda}" in message
    assert "--device cpu" in message and "update the driver" in message
    assert pick_device("cpu") == torch.device("cpu")  # asked for: no refusal
    monkeypatch.setattr(device_habits, "nvidia_device_present", lambda: False)
    assert pick_device() == torch.device("cpu")  # no GPU at all: the CPU, as before


# ----------------------------------------------------------------------------- attention kernels


def test_masked_grouped_query_attention_equals_the_expanded_reference(tiny_config):
    torch.manual_seed(0)
    attention, T = SelfAttention(tiny_config), 12
    x = torch.randn(2, T, tiny_config.hidden_size)
    model = Transformer(tiny_config)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    mask = bd3lm_attention_mask(6, 3)[None, None]
    out = attention(x, cos, sin, mask, False, None, 0)
    heads, kv_heads, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = apply_rope(attention.q_proj(x).view(2, T, heads, d).transpose(1, 2), cos, sin)
    k = apply_rope(attention.k_proj(x).view(2, T, kv_heads, d).transpose(1, 2), cos, sin)
    v = attention.v_proj(x).view(2, T, kv_heads, d).transpose(1, 2)
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))  # head h reads kv head h // group
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
    reference = attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, -1))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_the_shared_block_mask_is_built_once_and_equals_a_fresh_one():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mask = bd3lm_attention_mask(128, 32)  # 2 x 2 FlexAttention tiles: empty, partial and full ones
    assert bd3lm_attention_mask(128, 32) is mask and bd3lm_attention_mask(128, 64) is not mask
    cached = block_mask_from_dense(mask, 256, 256)
    assert block_mask_from_dense(mask, 256, 256) is cached
    fresh = flex.create_block_mask(lambda b, h, q, k: mask.clone()[q, k], None, None, 256, 256, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(cached, name), getattr(fresh, name)), name
    assert torch.equal(flex.create_mask(cached.mask_mod, None, None, 256, 256, device="cpu")[0, 0], mask)
    edited = mask.clone()
    assert block_mask_from_dense(edited, 256, 256) is not cached  # another tensor, even with equal values
    edited[0, 200] = True  # an in-place edit is seen (the version counter), not served from the cache
    rebuilt = block_mask_from_dense(edited, 256, 256)
    assert rebuilt is not cached and torch.equal(
        flex.create_mask(rebuilt.mask_mod, None, None, 256, 256, device="cpu")[0, 0], edited
    )


# ----------------------------------------------------------------------------- block diffusion's head


class FullHead(torch.nn.Module):
    """The earlier computation: the head over all 2L outputs, the needed ones picked afterwards."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, ids, attention, positions, logits_at, targets=None):
        return logits_or_nll(self.inner(ids, attention=attention, positions=positions)[:, logits_at], targets)


@pytest.mark.parametrize("shifted,block_size", [(False, 4), (True, 4), (True, 1), (True, 16)])
def test_block_diffusion_heads_only_the_needed_outputs_with_an_unchanged_loss(tiny_config, shifted, block_size):
    tiny_config.logit_shift = shifted
    torch.manual_seed(0)
    model, head_rows = Transformer(tiny_config), []
    model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(args[0].shape[1]))
    ids = rows(3)
    noisy = ids.masked_fill(ids > 50, MASK_ID)
    logits = bdlm_forward(model, noisy, ids, block_size)
    assert head_rows == [16] and logits.shape[1] == 16  # L rows reach the head, not 2L
    full = model(torch.cat([noisy, ids], 1), bd3lm_attention_mask(16, block_size), positions=torch.arange(16).repeat(2))
    if shifted:  # a block's first position reads the clean copy of its left neighbour
        starts = (torch.arange(16) % block_size == 0)[None, :, None]
        expected = torch.where(starts, read_shifted(full[:, 16:]), read_shifted(full[:, :16]))
    else:
        expected = full[:, :16]
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    objective = DiffusionObjective(block_size=block_size)
    losses = [
        diffusion_loss(m, ids, torch.Generator().manual_seed(1), MASK_ID, objective) for m in (model, FullHead(model))
    ]
    assert abs(losses[0].item() - losses[1].item()) <= 1e-6


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_fp32_one_with_its_gradient(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, 101) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (37,)).index_fill(0, torch.tensor([2, 30]), -100)
    weights = torch.rand(37)
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    chunked = chunked_cross_entropy(logits, targets, -100, chunk_rows=8)
    (grad,) = torch.autograd.grad((chunked * weights).sum(), logits)
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype and chunked[2] == 0 and (grad[2] == 0).all()
    torch.testing.assert_close(
        grad.float(), expected_grad.float(), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-3
    )


def test_cpu_cross_entropy_is_the_plain_fp32_one_bit_for_bit():
    logits, targets = torch.randn(2, 9, 101), torch.randint(0, 101, (2, 9))
    plain = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    assert torch.equal(fp32_cross_entropy(logits.flatten(0, 1), targets.flatten(), -100), plain)


def test_the_memory_estimate_counts_the_seed_models_parameters_and_what_chunking_saves():
    config = preset("minimind2_small")  # the seed commands' shape
    compiled, chunked, plain = (step_memory(config, 96, 256, False, loss) for loss in ("compiled", "chunked", "plain"))
    assert chunked.weights_and_adamw == 16 * 25_862_656 and chunked.activations == plain.activations
    assert plain.logits_and_loss - chunked.logits_and_loss > 96 * 256 * config.vocab_size * 4  # > one fp32 [N, V]
    assert compiled.logits_and_loss < chunked.logits_and_loss and compiled.activations == chunked.activations
    assert step_memory(config, 96, 256, True, "chunked").activations > 1.9 * chunked.activations  # 2L tokens per row


def test_tf32_is_turned_on_for_cuda_runs_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        device_habits.enable_tf32(CPU)
        assert not torch.backends.cuda.matmul.allow_tf32
        device_habits.enable_tf32(torch.device("cuda"))  # only flags: no CUDA device is touched
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_flex_probe_runs_one_full_tile_per_half_in_the_models_head_shape(tiny_config, monkeypatch):
    seen = []

    def kernel(q, k, v, block_mask, enable_gqa):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), enable_gqa))
        return q * 2.0

    monkeypatch.setattr(block_attention, "flex_attention_kernel", kernel)
    block_attention.flex_probe(Transformer(tiny_config), CPU)
    heads, kv_heads, head_dim = 4, 2, 16  # the tiny config: 64 wide, 4 query heads sharing 2 key/value heads
    assert seen == [((1, heads, 256, head_dim), (1, kv_heads, 256, head_dim), (1, kv_heads, 256, head_dim), True)]


def test_a_model_without_flex_attention_is_never_probed():
    said, probed = [], []
    model = SimpleNamespace(flex_on_cpu=True)  # no flex_attention attribute: a model this code does not know
    assert not choose_flex(model, torch.device("cuda"), probe=lambda m, d: probed.append(m), say=said.append)
    assert said == [] and probed == []


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: it sends fp32_cross_entropy down its chunked (CUDA) path on the CPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_the_cuda_path_of_fp32_cross_entropy_reduces_as_f_cross_entropy(reduction):
    logits = torch.randn(12, 7, requires_grad=True)
    targets = torch.randint(0, 7, (12,))
    targets[[2, 5]] = -100
    got = fp32_cross_entropy(logits.as_subclass(_ClaimsCuda), targets, -100, reduction=reduction)
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
    assert torch.allclose(got, want, atol=1e-6)
    (got_grad,), (want_grad,) = torch.autograd.grad(got.sum(), logits), torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(got_grad, want_grad, atol=1e-6)
