"""The logit shift of AR-converted diffusion models in every loss and likelihood estimator, and position-dependent
masking (model/logit_shift.py, model/block_attention.py, model/objectives/diffusion_loss.py,
model/inference/likelihood.py)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import UniformModel

from model.block_attention import bdlm_forward
from model.config import preset
from model.errors import NanoLladaError
from model.inference.likelihood import (
    ar_nll_rows,
    conditional_log_likelihood_batch,
    diffusion_nelbo_rows,
    diffusion_nelbo_terms,
)
from model.logit_shift import is_shifted, predictable, read_shifted
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.masking import position_rates, warped_time
from model.objectives.schedule import NoiseSchedule
from model.transformer import Transformer

V = 97
MASK = V - 1


def models() -> tuple[Transformer, Transformer]:
    """(AR model, the same weights as a shifted diffusion model)."""
    torch.manual_seed(0)
    ar = Transformer(preset("tiny", vocab_size=V)).eval()
    shifted = copy.deepcopy(ar)
    shifted.config.logit_shift = True
    return ar, shifted


class ShiftedUniform(UniformModel):
    config = SimpleNamespace(logit_shift=True)


def rows(n=4, length=16, seed=0):
    return torch.randint(3, MASK, (n, length), generator=torch.Generator().manual_seed(seed))


def test_shift_with_blocks_of_one_is_the_ar_model():
    """Blocks of 1: every position is predicted from the clean prefix before it, the AR model's own logits."""
    ar, shifted = models()
    ids = rows()
    noisy = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.5, MASK)
    with torch.no_grad():
        predictions = bdlm_forward(shifted, noisy, ids, block_size=1)
        expected = ar(ids, attention="causal")
    torch.testing.assert_close(predictions[:, 1:], expected[:, :-1], atol=1e-5, rtol=1e-5)


def test_shift_with_blocks_of_one_has_the_ar_likelihood():
    ar, shifted = models()
    ids = rows()
    scored = torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    nelbo = diffusion_nelbo_rows(shifted, ids, scored, MASK, 3, torch.Generator().manual_seed(0), block_size=1)
    exact = ar_nll_rows(ar, ids, scored)
    for draw in nelbo:  # every block of one is masked in every draw, with weight 1: no Monte-Carlo noise at all
        torch.testing.assert_close(draw, exact, atol=1e-4, rtol=1e-5)


def test_shifted_bidirectional_predictions_are_read_one_position_left():
    _, shifted = models()
    ids = rows()
    with torch.no_grad():
        raw = shifted(ids, attention="bidirectional")
    assert torch.equal(read_shifted(raw)[:, 1:], raw[:, :-1])
    before = torch.randn(ids.shape[0], V)
    assert torch.equal(read_shifted(raw, before)[:, 0], before)


def test_is_shifted_reads_the_config_through_wrappers():
    ar, shifted = models()
    assert not is_shifted(ar) and is_shifted(shifted)
    assert is_shifted(SimpleNamespace(module=shifted))  # DDP keeps the model in .module
    assert not is_shifted(UniformModel())


@pytest.mark.parametrize(
    "objective",
    [
        DiffusionObjective(),
        DiffusionObjective(block_size=4),
        DiffusionObjective(normalization="row"),
        DiffusionObjective(position_masking=2.0),
        DiffusionObjective(block_size=4, position_masking=2.0),
        DiffusionObjective(NoiseSchedule("cosine"), block_size=8, position_masking=1.0),
    ],
    ids=["eq3", "block4", "row", "positional", "block4_positional", "cosine_block8_positional"],
)
@pytest.mark.parametrize("shift", [False, True])
def test_losses_average_ln_v_under_uniform_logits(objective, shift):
    """Unbiased with the shift (the first token is never a target) and with position-dependent masking (its own
    weights): ln|V| per scored token either way."""
    vocab = 8
    model = ShiftedUniform(vocab) if shift else UniformModel(vocab)
    ids = torch.randint(0, vocab - 1, (64, 16), generator=torch.Generator().manual_seed(0)) + 1
    gen = torch.Generator().manual_seed(1)
    losses = torch.tensor([diffusion_loss(model, ids, gen, vocab - 1, objective).item() for _ in range(300)])
    tolerance = max(0.02 * math.log(vocab), 4 * losses.std().item() / math.sqrt(len(losses)))
    assert losses.mean().item() == pytest.approx(math.log(vocab), abs=tolerance)


def test_a_shifted_model_never_masks_the_first_token():
    model = ShiftedUniform(V)
    ids = rows()
    objective = DiffusionObjective(t_min=0.998, t_max=0.998)  # nearly everything else masked
    diffusion_loss(model, ids, torch.Generator().manual_seed(0), MASK, objective)
    assert (model.inputs[-1][:, 0] == ids[:, 0]).all()
    terms = diffusion_nelbo_terms(model, ids, MASK, 2, torch.Generator().manual_seed(0))
    assert (model.inputs[-1][:, 0] == ids[:, 0]).all() and terms.shape == (2, ids.shape[0])


def test_shifted_estimators_give_ln_v_for_uniform_logits():
    model = ShiftedUniform(V)
    ids = rows()
    scored = torch.ones_like(ids, dtype=torch.bool)
    scored[:, 0] = False
    for block_size in (None, 4):
        terms = diffusion_nelbo_rows(model, ids, scored, MASK, 4, torch.Generator().manual_seed(0), block_size)
        torch.testing.assert_close(terms, torch.full_like(terms, 15 * math.log(V)))
    with pytest.raises(ValueError, match="position 0"):
        diffusion_nelbo_rows(model, ids, torch.ones_like(scored), MASK, 1, torch.Generator())
    answers = [[5], [6, 7, 8]]
    for block_size in (None, 4):
        scores = conditional_log_likelihood_batch(model, [1, 2], answers, MASK, 8, block_size=block_size)
        assert [value for value, _ in scores] == pytest.approx([-len(a) * math.log(V) for a in answers])
    with pytest.raises(ValueError, match="prompt"):
        conditional_log_likelihood_batch(model, [], answers, MASK, 8)


def test_position_rates_mask_later_tokens_more():
    k = position_rates(8, 4, 2.0)
    assert k[0] == 1 and k[4] == 1  # each block starts at the ordinary schedule
    assert torch.all(k[1:4] > k[:3]) and k[3].item() == pytest.approx(math.exp(2.0))
    assert torch.equal(position_rates(8, None, 0.0), torch.ones(8))
    t = torch.tensor([[0.1], [0.5], [0.9]])
    tau, slope = warped_time(t, k)
    assert torch.all(tau >= t - 1e-6) and torch.allclose(tau[:, 0], t[:, 0])  # masked at least as often
    assert torch.all(tau[:, 1:4] > tau[:, :3])
    assert torch.allclose(slope[:, 0], torch.ones(3))


def test_position_masking_refuses_complementary_masks():
    with pytest.raises(NanoLladaError, match="complementary"):
        DiffusionObjective(position_masking=1.0, complementary=True)


def test_a_shifted_row_of_one_token_has_nothing_to_predict():
    """Position 0 is never predicted by a shifted model, even when it is the whole row."""
    one = torch.ones(2, 1, dtype=torch.bool)
    assert not predictable(one, shifted=True).any() and predictable(one, shifted=False).all()
    assert predictable(torch.ones(2, 0, dtype=torch.bool), shifted=True).shape == (2, 0)
