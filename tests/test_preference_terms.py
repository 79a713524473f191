"""The terms that keep DPO's chosen answer up (RPO's NLL, DPOP's floor, IPO, SimPO), each against its closed form on a
hand-made case; the exact-count answer bound and paired draws of diffusion DPO; the stop line on the chosen drift."""

import math

import pytest
import torch
from conftest import UniformModel

from model.errors import NanoLladaError
from model.objectives.preference import (
    ElboSampling,
    PreferenceLoss,
    diffusion_answer_elbo,
    draw_answer_masks,
    preference_loss,
)
from scripts.common.settings import settings_from
from scripts.common.training.dpo import MAX_CHOSEN_DROP, DPOData, ValidationStats, dpo_parser

# Two pairs: log pi [B, 2], log pi_ref [B, 2] (chosen, rejected) and answer token counts.
POLICY = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])
REFERENCE = torch.tensor([[-2.0, -2.0], [-1.5, -1.5]])
LENGTHS = torch.tensor([[2, 4], [1, 2]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def loss_of(**terms) -> float:
    return preference_loss(POLICY, REFERENCE, LENGTHS, PreferenceLoss(**terms))[0].item()


def test_plain_dpo_is_the_closed_form_with_its_statistics():
    loss, stats = preference_loss(POLICY, REFERENCE, LENGTHS, PreferenceLoss(beta=0.5, nll_weight=0))
    # margins: 0.5 * ((-1 + 2) - (-3 + 2)) = 1 and 0.5 * ((-2 + 1.5) - (-1 + 1.5)) = -0.5
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(0.5)) / 2, abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx(0.25)
    assert stats["reward_chosen"].item() == pytest.approx((0.5 - 0.25) / 2)
    assert stats["reward_rejected"].item() == pytest.approx((-0.5 + 0.25) / 2)
    assert stats["accuracy"].item() == 0.5
    # the drift statistics: chosen log-ratios +1 and -0.5 (per token +0.5 and -0.5), rejected -1 and +0.5
    assert stats["chosen_drift"].item() == pytest.approx(0.25)
    assert stats["rejected_drift"].item() == pytest.approx(-0.25)
    assert stats["chosen_drift_per_token"].item() == pytest.approx(0.0)
    assert stats["chosen_nll_per_token"].item() == pytest.approx((1 / 2 + 2 / 1) / 2)


def test_rpo_adds_the_chosen_answers_nll_per_token():
    dpo = (softplus(-1.0) + softplus(0.5)) / 2
    # chosen NLL per token: 1 / 2 and 2 / 1
    assert loss_of(beta=0.5, nll_weight=0.3) == pytest.approx(dpo + 0.3 * (0.5 + 2.0) / 2, abs=1e-6)


def test_dpop_floor_penalises_only_a_chosen_answer_below_the_reference():
    # pair 1: chosen log-ratio +1, no penalty; pair 2: -0.5, z = -1 - 2 * 0.5 = -2
    expected = (softplus(-0.5 * 2.0) + softplus(-0.5 * -2.0)) / 2
    assert loss_of(beta=0.5, nll_weight=0, chosen_floor=2.0) == pytest.approx(expected, abs=1e-6)


def test_ipo_is_the_squared_distance_to_half_over_beta():
    # z = 2 and -1; 1 / (2 beta) = 1
    assert loss_of(beta=0.5, nll_weight=0, loss_type="ipo") == pytest.approx(((2 - 1) ** 2 + (-1 - 1) ** 2) / 2)


def test_simpo_is_reference_free_length_normalised_with_a_target_margin():
    # z per token: -1/2 - (-3/4) = 0.25 and -2/1 - (-1/2) = -1.5; loss softplus(-(beta z - gamma))
    expected = (softplus(-(2.0 * 0.25 - 0.1)) + softplus(-(2.0 * -1.5 - 0.1))) / 2
    terms = dict(beta=2.0, nll_weight=0, reference_free=True, length_normalized=True, target_margin=0.1)
    assert loss_of(**terms) == pytest.approx(expected, abs=1e-6)
    # length normalisation alone: per-token log-ratios (1/2 - (-1/4)) and (-1/2 - 1/4)
    expected = (softplus(-0.5 * 0.75) + softplus(0.5 * 0.75)) / 2
    assert loss_of(beta=0.5, nll_weight=0, length_normalized=True) == pytest.approx(expected, abs=1e-6)


def test_a_bad_loss_type_or_estimator_is_a_clear_error():
    with pytest.raises(NanoLladaError, match="loss type 'dpo'"):
        PreferenceLoss(loss_type="dpo")
    with pytest.raises(NanoLladaError, match="ELBO estimator 'iid'"):
        ElboSampling(estimator="iid")


def answer_rows():
    """Three rows of 10 positions with answers of 6, 2 and 1 tokens, and lengths."""
    answer = torch.zeros(3, 10, dtype=torch.bool)
    for row, (start, end) in enumerate([(4, 10), (6, 8), (5, 6)]):
        answer[row, start:end] = True
    return torch.randint(3, 100, (3, 10)), torch.tensor([10, 8, 6]), answer


def test_exact_count_draws_score_exactly_n_ln_v_under_uniform_logits_for_every_draw():
    input_ids, length, answer = answer_rows()
    draws = draw_answer_masks(answer, ElboSampling(samples=6, paired=False), torch.Generator().manual_seed(0))
    assert not (draws.masked & ~answer).any()
    counts = draws.masked.sum(-1)  # [S, R]: stratified, so the 6-token answer takes every count 1..6 once
    assert sorted(counts[:, 0].tolist()) == [1, 2, 3, 4, 5, 6] and (counts[:, 2] == 1).all()
    per_draw = (draws.masked * draws.weights).sum(-1)  # weight n / l on l masked tokens: n
    assert torch.equal(per_draw, answer.sum(1).double().expand(6, 3))
    estimate = diffusion_answer_elbo(UniformModel(101), input_ids, length, draws, 100)
    assert torch.allclose(estimate.double(), -answer.sum(1).double() * math.log(101), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["exact_count", "bernoulli"])
def test_paired_draws_give_two_equal_answers_the_same_masks(estimator):
    """A chosen and a rejected answer of one length at different starts: paired, the same masks counted from the
    answer start; unpaired, not."""
    answer = torch.zeros(4, 12, dtype=torch.bool)
    answer[0, 3:8], answer[1, 5:10], answer[2, 2:5], answer[3, 2:4] = True, True, True, True
    paired = draw_answer_masks(
        answer, ElboSampling(64, estimator=estimator, paired=True), torch.Generator().manual_seed(1)
    )
    assert torch.equal(paired.masked[:, 0, 3:8], paired.masked[:, 1, 5:10])
    assert torch.equal(paired.weights[:, 0, 3], paired.weights[:, 1, 5])
    assert not (paired.masked & ~answer).any()
    unpaired = draw_answer_masks(
        answer, ElboSampling(64, estimator=estimator, paired=False), torch.Generator().manual_seed(1)
    )
    assert not torch.equal(unpaired.masked[:, 0, 3:8], unpaired.masked[:, 1, 5:10])


def test_the_stop_line_fires_past_the_bound_and_never_at_zero(tmp_path):
    said = []
    stats = {"accuracy": 0.6, "reward_margin": 0.1, "chosen_drift": -3.0, "chosen_drift_per_token": -0.75}
    validation = ValidationStats(tmp_path / "m.jsonl", max_chosen_drop=0.5, say=said.append)
    validation.add(stats, pairs=4)
    with pytest.raises(NanoLladaError, match=r"stopped at step 25: .* lost 0\.750 nats per token .*--max-chosen-drop"):
        validation.record(25, 0.6)
    for bound in (0.0, 1.0):  # 0: never; 1.0: not reached
        validation = ValidationStats(tmp_path / "m.jsonl", max_chosen_drop=bound, say=said.append)
        validation.add(stats, pairs=4)
        validation.record(25, 0.6)
        assert validation.last["val_chosen_drift_per_token"] == -0.75


def test_the_flags_build_the_terms_and_the_defaults_keep_the_chosen_answer_up():
    args = dpo_parser("", "dpo").parse_args(["--data", "p.jsonl", "--load-from", "sft.pt"])
    assert settings_from(DPOData, args).terms() == PreferenceLoss() and args.max_chosen_drop == MAX_CHOSEN_DROP > 0
    assert PreferenceLoss().nll_weight > 0  # plain DPO displaces the chosen answer (technical_report.md 7.5)
    flags = "--loss-type ipo --nll-weight 0 --chosen-floor 5 --length-normalized --reference-free --target-margin 1"
    args = dpo_parser("", "dpo").parse_args(["--data", "p.jsonl", "--load-from", "sft.pt", *flags.split()])
    assert settings_from(DPOData, args).terms() == PreferenceLoss(0.1, "ipo", 0.0, 5.0, True, True, 1.0)
