"""The training step has no host-device synchronisation and no data-dependent shapes.

A sync (`.item()`, `if x.any():`, boolean indexing such as `logits[masked]`, whose size the host must read back)
stalls the GPU every step and keeps torch.compile from capturing the step as one graph. Two detectors:
- Dynamo, fullgraph=True, with a backend that also rejects unbacked (data-dependent) sizes and scalars: recent
  torch captures `x[mask]` and `.item()` in the graph as unbacked symbols instead of raising, so fullgraph alone
  only catches data-dependent branching. torch.Generator arguments cannot be traced, so only the generator-free
  parts (the loss helpers and the model forward) are compiled.
- FakeTensorMode for whole losses, masks drawn from a generator, the model forward and the backward included:
  fake tensors have no data, so anything that needs a value on the host (nonzero, item, bool) raises.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from model.block_attention import bdlm_forward
from model.config import preset
from model.objectives.ar_loss import next_token_loss
from model.objectives.decoding_terms import cap_loss, repeat_unlikelihood
from model.objectives.diffusion_loss import (
    DiffusionObjective,
    diffusion_loss,
    masked_token_nll,
)
from model.objectives.schedule import NoiseSchedule
from model.tokenizer import EOS_ID
from model.transformer import Transformer

MASK_TOKEN_ID = preset("tiny").vocab_size - 1  # <|mask|> is the last id (model.tokenizer.mask_token_id)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def static_backend(inner: str = "eager"):
    """A Dynamo backend that fails on any data-dependent size or scalar in the graph, then hands it to `inner`."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if value is not None and free_unbacked_symbols(value):
                raise AssertionError(f"data-dependent value (a host sync) in the step: {node.format_node()}")
        return gm if inner == "eager" else lookup_backend(inner)(gm, example_inputs)

    return backend


def compile_static(fn, inner: str = "eager"):
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=static_backend(inner))


def _boolean_index(logits, targets, masked):
    return logits[masked].sum()


def _item(logits, targets, masked):
    return logits * logits.sum().item()


def _branch(logits, targets, masked):
    return logits.sum() if masked.any() else logits.mean()


@pytest.mark.parametrize("fn", [_boolean_index, _item, _branch])
def test_detectors_reject_each_kind_of_sync(fn):
    # Guards the tests below against passing vacuously (e.g. after a torch upgrade changes what Dynamo captures).
    logits, targets, masked = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), torch.rand(2, 5) < 0.5
    with pytest.raises(Exception):
        compile_static(fn)(logits, targets, masked)
    with pytest.raises(Exception), FakeTensorMode() as mode:
        fn(*(mode.from_tensor(x) for x in (logits, targets, masked)))


@pytest.mark.parametrize("masks", ["random", "none", "all"])
@pytest.mark.parametrize("helper", [masked_token_nll, repeat_unlikelihood, cap_loss])
def test_loss_helpers_compile_to_one_static_graph_with_eager_values(helper, masks):
    gen = torch.Generator().manual_seed(0)
    V = 7
    targets = torch.randint(0, 3, (2, 9), generator=gen)  # few ids: repeats and correct argmaxes occur
    logits = (3 * torch.randn(2, 9, V, generator=gen)).requires_grad_(True)
    masked = {
        "random": torch.rand(2, 9, generator=gen) < 0.6,
        "none": torch.zeros(2, 9, dtype=torch.bool),
        "all": torch.ones(2, 9, dtype=torch.bool),
    }[masks]
    eager = helper(logits, targets, masked)
    (eager_grad,) = torch.autograd.grad(eager.sum(), logits)
    compiled = compile_static(helper)(logits, targets, masked)
    (compiled_grad,) = torch.autograd.grad(compiled.sum(), logits)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)
    assert torch.isfinite(eager).all() and torch.isfinite(eager_grad).all()
    if masks == "none":
        assert (eager == 0).all() and (eager_grad == 0).all()


def _docs(ids):
    is_eos = (ids == EOS_ID).long()
    return is_eos.cumsum(-1) - is_eos


# Every loss a training step calls, with the switches that add code paths (draws from a generator included).
SFT = DiffusionObjective(normalization="row")
TRAINING_LOSSES = {
    "llada": lambda m, ids, g: diffusion_loss(m, ids, g, MASK_TOKEN_ID, DiffusionObjective(repeat_penalty_weight=0.1)),
    "llada_sft": lambda m, ids, g: diffusion_loss(m, ids, g, MASK_TOKEN_ID, SFT, maskable=ids > 50),
    "sft_padding_weight": lambda m, ids, g: diffusion_loss(
        m, ids, g, MASK_TOKEN_ID, DiffusionObjective(normalization="row", padding_weight=0.1), maskable=ids > 50
    ),
    "mdlm_docs_cosine": lambda m, ids, g: diffusion_loss(
        m, ids, g, MASK_TOKEN_ID, DiffusionObjective(NoiseSchedule("cosine")), doc_ids=_docs(ids)
    ),
    "bdlm_docs": lambda m, ids, g: diffusion_loss(
        m, ids, g, MASK_TOKEN_ID, DiffusionObjective(block_size=4), doc_ids=_docs(ids)
    ),
    "block_sft_cap_complementary": lambda m, ids, g: diffusion_loss(
        m,
        ids[:, :14],
        g,
        MASK_TOKEN_ID,
        DiffusionObjective(t_min=0.3, t_max=0.8, block_size=4, normalization="row", complementary=True, cap_weight=1.0),
        maskable=ids[:, :14] > 50,
    ),
    "sft_cap": lambda m, ids, g: diffusion_loss(
        m, ids, g, MASK_TOKEN_ID, DiffusionObjective(normalization="row", cap_weight=1.0), maskable=ids > 50
    ),
    "ar": lambda m, ids, g: next_token_loss(m, ids),
}


@pytest.mark.parametrize("name", TRAINING_LOSSES)
def test_training_losses_and_backward_need_no_value_on_the_host(name):
    with FakeTensorMode():
        model = Transformer(preset("tiny"))
        ids = torch.randint(1, 100, (2, 16)).index_fill(1, torch.tensor([5, 11]), EOS_ID)
        loss = TRAINING_LOSSES[name](model, ids, torch.Generator().manual_seed(0))
        loss.backward()
    assert loss.shape == () and model.lm_head.weight.grad is not None


@pytest.mark.parametrize("attention", ["causal", "bidirectional", "block_diffusion"])
def test_transformer_forward_compiles_fullgraph_with_eager_logits_and_gradients(attention):
    torch.manual_seed(0)
    model = Transformer(preset("tiny"))
    ids = torch.randint(1, 100, (2, 16))
    if attention == "block_diffusion":  # explicit mask and positions (SDPA on CPU)
        forward = lambda m, x: bdlm_forward(m, x.masked_fill(x > 60, MASK_TOKEN_ID), x, 4)  # noqa: E731
    else:
        forward = lambda m, x: m(x, attention=attention)  # noqa: E731
    eager = forward(model, ids)
    eager_grads = torch.autograd.grad(eager.square().mean(), list(model.parameters()))
    compiled = compile_static(forward, "aot_eager")(model, ids)
    grads = torch.autograd.grad(compiled.square().mean(), list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_compiled_forward_with_a_document_mask_runs_flex_attention_and_matches_sdpa():
    """The CUDA training path for explicit masks (FlexAttention inside a compiled model), on CPU: inference only,
    since FlexAttention has no CPU backward. A failure here would drop to the SDPA fallback and trip the assert."""
    from model.block_attention import document_attention_mask

    torch.manual_seed(0)
    model = Transformer(preset("tiny")).eval()
    ids = torch.randint(1, 100, (2, 64))
    mask = document_attention_mask(
        torch.cat([torch.zeros(2, 30, dtype=torch.long), torch.ones(2, 34, dtype=torch.long)], 1)
    )
    sdpa = model(ids, attention=mask)
    model.flex_on_cpu = True
    flex = torch.compile(model, backend="aot_eager")(ids, attention=mask)
    assert model.flex_attention, "FlexAttention failed under torch.compile and fell back to SDPA"
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)
