"""The loss inside the model's forward (Transformer.forward(..., targets=...)): equal to the logits path it
replaced, bit for bit on the CPU (a logit-shifted model's targets move instead of its logits), and traced into
the compiled model's graph."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MASK_ID as MASK_ID
from conftest import token_rows as rows

from model.block_attention import bdlm_forward
from model.objectives.ar_loss import next_token_loss
from model.objectives.diffusion_loss import diffusion_loss, scored_nll
from model.transformer import Transformer


@pytest.fixture(autouse=True)
def _fresh_dynamo(fresh_dynamo):
    """Every test here compiles: each starts and ends with Dynamo's caches empty."""


@pytest.mark.parametrize("shifted,block_size", [(False, None), (True, None), (False, 4), (True, 4)])
def test_the_loss_inside_the_forward_with_shifted_targets_equals_the_logits_path_bit_for_bit(
    tiny_config, shifted, block_size
):
    # The logits path is the computation before: the [B, L, V] logits out of the model, shifted right for a shifted
    # model (read_shifted), then the cross-entropy. Now the targets go in and move left instead.
    tiny_config.logit_shift = shifted
    torch.manual_seed(0)
    model, ids = Transformer(tiny_config), rows(5)
    masked = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < 0.5) & (torch.arange(16) > 0)
    noisy = ids.masked_fill(masked, MASK_ID)
    if block_size:
        forward, row_shift = partial(bdlm_forward, model, noisy, ids, block_size), False
    else:
        forward, row_shift = partial(model, noisy, attention="bidirectional"), shifted
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(7))
    results = []
    for need_logits in (False, True):
        nll, logits = scored_nll(forward, ids, masked, row_shift, need_logits)
        results.append((nll, torch.autograd.grad((nll * weights).sum(), list(model.parameters()))))
        assert (logits is None) != need_logits
    (nll, grads), (reference, reference_grads) = results
    assert torch.equal(nll, reference) and (nll[~masked] == 0).all() and (nll[masked] > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(grads, reference_grads))


def test_the_ar_loss_inside_the_forward_equals_the_mean_cross_entropy_of_the_logits(tiny_config):
    torch.manual_seed(0)
    model, ids = Transformer(tiny_config), rows(8)
    labels = ids.masked_fill(torch.arange(16) < 5, -100)
    loss = next_token_loss(model, ids, labels)
    (grad,) = torch.autograd.grad(loss, model.lm_head.weight)
    logits = model(ids, attention="causal")
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    (reference_grad,) = torch.autograd.grad(reference, model.lm_head.weight)
    # the same per-token terms, summed in another order: equal to the last bit or two; the gradients exactly
    torch.testing.assert_close(loss, reference, rtol=3e-7, atol=0)
    assert torch.equal(grad, reference_grad)


def test_the_cross_entropy_is_traced_into_the_compiled_models_graph(tiny_config):
    graphs = []

    def keep(graph_module, example_inputs):  # Dynamo's graph as traced, run as it is
        graphs.append(graph_module.code)
        return graph_module.forward

    tiny_config.logit_shift = True
    compiled_model = torch.compile(Transformer(tiny_config), backend=keep, dynamic=False)
    diffusion_loss(compiled_model, rows(9), torch.Generator().manual_seed(0), MASK_ID).backward()
    counters = torch._dynamo.utils.counters
    assert len(graphs) == 1 and "cross_entropy" in graphs[0] and not counters["graph_break"]
