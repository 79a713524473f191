"""Invariants of the masking rules and of the one diffusion loss (model/objectives/masking.py,
model/objectives/diffusion_loss.py)."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import UniformModel

from model.cross_entropy import logits_or_nll
from model.errors import NanoLladaError
from model.objectives.decoding_terms import cap_loss, repeat_unlikelihood
from model.objectives.diffusion_loss import (
    DiffusionObjective,
    diffusion_loss,
    draw_masks,
)
from model.objectives.masking import (
    bernoulli_masks,
    eos_padding,
    mask_exactly,
    random_crop_length,
    stratified_counts,
)
from model.objectives.schedule import LINEAR, NoiseSchedule
from model.tokenizer import EOS_ID
from model.transformer import Transformer

V, MASK = 101, 100


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


def sft_rows(rows: int, answer_len: int, row_len: int, vocab: int = V) -> tuple[torch.Tensor, torch.Tensor]:
    """SFT-like rows: a prompt, then an answer region of answer_len maskable tokens (content, the closing EOS, and
    EOS padding in its second half)."""
    prompt_len = row_len - answer_len
    ids = torch.randint(3, vocab, (rows, row_len), generator=rng())
    ids[:, prompt_len + max(1, answer_len // 2) - 1 :] = EOS_ID
    maskable = torch.arange(row_len)[None, :].expand(rows, -1) >= prompt_len
    return ids, maskable


LENGTHS = [(answer, row) for row in (16, 256) for answer in (1, 2, 4, 16, 64) if answer <= row]


@pytest.mark.parametrize("schedule", [LINEAR, NoiseSchedule("cosine")])
@pytest.mark.parametrize("answer_len,row_len", LENGTHS)
def test_every_training_loss_averages_ln_v_under_uniform_logits(schedule, answer_len, row_len):
    """Unbiased for any answer or row length: a row that drew no mask adds 0 (nothing is forced in at weight 1/t).
    Within 2 %, or 4 standard errors where one answer token per row leaves the 1/t estimate too noisy for 2 % in
    the rows drawn here (forcing a mask, as the code once did, gave 2.2 ln|V| at 4 answer tokens: far outside
    either)."""
    vocab = 8  # the estimator does not depend on |V|; a small one keeps 100k rows cheap
    ids, maskable = sft_rows(4096 // row_len, answer_len, row_len, vocab)
    settings = {
        "pretraining": (DiffusionObjective(schedule), None),
        "sft": (DiffusionObjective(schedule, normalization="row"), maskable),
        "sft_padding_weight": (DiffusionObjective(schedule, normalization="row", padding_weight=0.1), maskable),
        "sft_token_mean": (DiffusionObjective(schedule, normalization="batch"), maskable),
        "sft_block": (DiffusionObjective(schedule, block_size=4, normalization="row", complementary=True), maskable),
        "sft_late_density": (DiffusionObjective(schedule, normalization="row", late_time_share=0.5), maskable),
        "sft_all_masked": (DiffusionObjective(schedule, normalization="row", all_masked_share=0.5), maskable),
    }
    gen = rng(1)
    for name, (objective, scored) in settings.items():
        model = UniformModel(vocab)
        losses = torch.tensor(
            [diffusion_loss(model, ids, gen, vocab - 1, objective, scored).item() for _ in range(200)]
        )
        tolerance = max(0.02 * math.log(vocab), 4 * losses.std().item() / math.sqrt(len(losses)))
        assert losses.mean().item() == pytest.approx(math.log(vocab), abs=tolerance), name


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("answer_len,row_len", LENGTHS)
def test_count_draw_is_exactly_ln_v_per_draw_under_uniform_logits(block_size, answer_len, row_len):
    """l of n answer tokens masked, each weighted n / l: with uniform logits every single draw is ln|V| (the time
    draw is only right on average), and with EOS padding weighted down it is right on average."""
    vocab = 8
    ids, maskable = sft_rows(max(1, 1024 // row_len), answer_len, row_len, vocab)
    gen = rng(2)
    exact = DiffusionObjective(block_size=block_size, normalization="row", mask_draw="count")
    for _ in range(20):
        loss = diffusion_loss(UniformModel(vocab), ids, gen, vocab - 1, exact, maskable)
        assert loss.item() == pytest.approx(math.log(vocab), rel=1e-5)
    padded = DiffusionObjective(block_size=block_size, normalization="row", padding_weight=0.1, mask_draw="count")
    losses = torch.tensor(
        [diffusion_loss(UniformModel(vocab), ids, gen, vocab - 1, padded, maskable).item() for _ in range(200)]
    )
    tolerance = max(0.02 * math.log(vocab), 4 * losses.std().item() / math.sqrt(len(losses)))
    assert losses.mean().item() == pytest.approx(math.log(vocab), abs=tolerance)


def test_count_draw_has_the_time_draws_expectation_with_less_variance(tiny_config):
    """On a real (random) model the two draws estimate the same loss; the count draw's weight is bounded by n."""
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    ids, maskable = sft_rows(8, 6, 16, tiny_config.vocab_size)
    gen = rng(3)
    with torch.no_grad():
        draws = {
            draw: torch.tensor(
                [
                    diffusion_loss(
                        model, ids, gen, MASK, DiffusionObjective(normalization="row", mask_draw=draw), maskable
                    )
                    for _ in range(600)
                ]
            )
            for draw in ("time", "count")
        }
    time, count = draws["time"], draws["count"]
    standard_error = math.sqrt(time.var() / len(time) + count.var() / len(count))
    assert abs(time.mean() - count.mean()) < 4 * standard_error
    assert count.std() < 0.7 * time.std()


def test_count_draw_refuses_what_it_does_not_estimate():
    for settings in ({"schedule": NoiseSchedule("cosine")}, {"complementary": True}, {"t_min": 0.3, "t_max": 0.8}):
        with pytest.raises(NanoLladaError, match="count mask draw"):
            DiffusionObjective(mask_draw="count", **settings)
    with pytest.raises(NanoLladaError, match="mask_draw"):
        DiffusionObjective(mask_draw="exact")


def test_a_row_with_no_mask_contributes_nothing():
    ids, maskable = sft_rows(4, 1, 16)
    objective = DiffusionObjective(t_min=1e-3, t_max=1e-3, normalization="row")  # almost never masked
    assert diffusion_loss(UniformModel(), ids, rng(), MASK, objective, maskable).item() == 0.0


def test_stratified_counts_are_exactly_uniform_and_balanced():
    for n in range(1, 9):
        counts = stratified_counts(torch.tensor([n]), 4 * n, rng(n))[:, 0]
        assert torch.equal(torch.bincount(counts, minlength=n + 1)[1:], torch.full((n,), 4))  # exactly balanced
        # every single draw is uniform on 1..n: its histogram over many offsets
        draws = stratified_counts(torch.full((20_000,), n), 3, rng(n))  # [3, rows]
        for d in range(3):
            freq = torch.bincount(draws[d], minlength=n + 1)[1:].double() / 20_000
            assert torch.allclose(freq, torch.full((n,), 1 / n, dtype=torch.float64), atol=0.02), (n, d)
    assert torch.equal(stratified_counts(torch.tensor([2]), 32, rng())[:, 0].bincount()[1:], torch.tensor([16, 16]))
    assert (stratified_counts(torch.tensor([0, 5]), 6, rng())[:, 0] == 0).all()


def test_mask_exactly_masks_the_count_among_scored_positions():
    scored = torch.rand(50, 30, generator=rng()) < 0.6
    counts = (scored.sum(1) * torch.rand(50, generator=rng(1))).long()
    masked = mask_exactly(scored, counts, rng(2))
    assert torch.equal(masked.sum(1), counts) and not (masked & ~scored).any()


def test_masking_respects_maskable_and_never_forces_a_mask():
    maskable = torch.rand(500, 40, generator=rng(1)) < 0.7
    masked = bernoulli_masks(maskable, torch.full((500,), 1e-4), rng(2))
    assert not (masked & ~maskable).any() and masked.sum() < 10  # tiny t: next to nothing is masked
    masked = bernoulli_masks(maskable, torch.full((500,), 0.3), rng(3))
    assert masked.sum() / maskable.sum() == pytest.approx(0.3, abs=0.01)


def test_complementary_masks_are_disjoint_and_cover_the_response():
    maskable = torch.zeros(200, 24, dtype=torch.bool)
    maskable[:, 7:] = True  # prompt = first 7 positions
    masked, complement = draw_masks(DiffusionObjective(complementary=True), maskable, rng(1))[0].chunk(2)
    assert not (masked & complement).any() and torch.equal(masked | complement, maskable)
    assert not masked[:, :7].any() and not complement[:, :7].any()


def test_eos_padding_is_the_trailing_eos_after_the_closing_one():
    ids = torch.tensor([[1, 5, 6, 7, 2, 2, 2], [1, 5, 2, 7, 8, 9, 2], [1, 2, 6, 2, 2, 2, 2]])
    maskable = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]).bool()
    expected = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]]).bool()
    assert torch.equal(eos_padding(ids, maskable), expected)
    # Capped padding: PAD columns after the run are not part of the row, and are never padding themselves.
    capped = torch.tensor([[1, 5, 6, 2, 2, 0, 0], [1, 5, 6, 7, 2, 2, 2]])
    maskable = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]).bool()
    expected = torch.tensor([[0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 1]]).bool()
    assert torch.equal(eos_padding(capped, maskable), expected)


def test_time_weights_are_elbo_weights():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(LINEAR.elbo_weight(t), 1 / t) and torch.equal(LINEAR.mask_probability(t), t)
    cosine = NoiseSchedule("cosine")
    alpha = lambda s: torch.cos(math.pi * s / 2) ** 2  # noqa: E731  cosine: alpha = cos^2(pi t / 2)
    derivative = (alpha(t + 1e-4) - alpha(t - 1e-4)) / 2e-4
    assert torch.allclose(cosine.elbo_weight(t), -derivative / (1 - alpha(t)), rtol=1e-3)
    for schedule in (LINEAR, cosine):
        assert torch.allclose(schedule.clean_probability(t) + schedule.mask_probability(t), torch.ones(3))
    with pytest.raises(NanoLladaError, match="unknown noise schedule 'cubic'"):
        NoiseSchedule("cubic")
    with pytest.raises(NanoLladaError, match=r"must be a model\.objectives\.schedule\.NoiseSchedule, got 'cosine'"):
        DiffusionObjective("cosine")  # the name alone, as before the object
    with pytest.raises(NanoLladaError, match="time range"):
        DiffusionObjective(t_min=0.8, t_max=0.3)


def test_block_size_equal_to_the_row_is_the_bidirectional_loss(tiny_config):
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    ids = torch.randint(1, mask_id, (3, 16), generator=rng())
    for schedule in (LINEAR, NoiseSchedule("cosine")):
        bidirectional = diffusion_loss(model, ids, rng(7), mask_id, DiffusionObjective(schedule))
        block = diffusion_loss(model, ids, rng(7), mask_id, DiffusionObjective(schedule, block_size=16))
        assert block.item() == pytest.approx(bidirectional.item(), rel=1e-5)
        smaller = diffusion_loss(model, ids, rng(7), mask_id, DiffusionObjective(schedule, block_size=4))
        assert smaller.item() != pytest.approx(bidirectional.item(), rel=1e-3)  # blocks change what a token sees


def test_unmasked_positions_get_zero_gradient(tiny_config):
    model, captured = Transformer(tiny_config), {}

    class Capture(nn.Module):
        def forward(self, ids, attention="bidirectional", targets=None):
            captured["ids"], captured["logits"] = ids, model(ids, attention=attention)
            captured["logits"].retain_grad()
            return logits_or_nll(captured["logits"], targets)

    ids = torch.randint(1, tiny_config.vocab_size - 1, (4, 32), generator=rng())
    diffusion_loss(Capture(), ids, rng(1), tiny_config.vocab_size - 1).backward()
    grad, masked = captured["logits"].grad, captured["ids"] == tiny_config.vocab_size - 1
    assert masked.any() and (~masked).any()
    assert (grad[~masked] == 0).all() and (grad[masked].abs().sum(-1) > 0).all()


def test_random_crop_length_and_repeat_term():
    lengths = [random_crop_length(30, 0.5, rng(seed), multiple_of=4) for seed in range(400)]
    cropped = [n for n in lengths if n < 30]
    assert 0.35 < len(cropped) / 400 < 0.65 and all(n % 4 == 0 and n >= 4 for n in cropped)
    assert all(random_crop_length(30, 0.0, rng(seed)) == 30 for seed in range(20))
    targets, masked = torch.tensor([[5, 5, 5, 6]]), torch.ones(1, 4, dtype=torch.bool)
    assert repeat_unlikelihood(torch.zeros(1, 4, V), targets, masked).item() == pytest.approx(
        -math.log(1 - 1 / V), rel=1e-4
    )
    assert repeat_unlikelihood(torch.zeros(1, 4, V), torch.tensor([[1, 2, 3, 4]]), masked).item() == 0


def test_cap_loss_is_nonnegative_zero_without_correct_predictions_and_for_one_hot():
    targets, masked = torch.tensor([[3, 4, 5, 6]]), torch.tensor([[True, True, False, True]])
    assert cap_loss(torch.randn(1, 4, 10, generator=rng()), targets, masked).item() >= 0
    wrong = torch.zeros(1, 4, 10)
    wrong[..., 0] = 5.0  # argmax 0 is never a target
    assert cap_loss(wrong, targets, masked).item() == 0
    one_hot = torch.full((1, 4, 10), float("-inf"))
    one_hot[0, torch.arange(4), targets[0]] = 0.0
    one_hot.requires_grad_(True)
    exact = cap_loss(one_hot, targets, masked)
    exact.backward()
    assert exact.item() == 0 and torch.isfinite(one_hot.grad).all()
    assert cap_loss(torch.zeros(1, 4, 10), targets, torch.zeros_like(masked)).item() == 0  # nothing masked


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize(
    "objective",
    [
        DiffusionObjective(padding_weight=0.1),
        DiffusionObjective(normalization="batch", mask_draw="count"),
        DiffusionObjective(complementary=True, cap_weight=0.5),
    ],
    ids=["row_padding", "batch_count", "complementary_cap"],
)
def test_sft_loss_with_the_head_at_listed_positions_equals_the_full_loss(shifted, objective):
    """The head run only at the listed answer positions (scripts.common.data.sft.flagged_first) gives the loss and
    gradients of the head run everywhere, for rows whose prompts and answers differ in length."""
    from model.config import ModelConfig
    from scripts.common.data.sft import flagged_first

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            logit_shift=shifted,
        )
    )
    ids = torch.randint(3, 60, (3, 12))
    maskable = torch.zeros(3, 12, dtype=torch.bool)
    for row, prompt in enumerate((3, 7, 10)):
        maskable[row, prompt:] = True
        ids[row, prompt + 2 :] = EOS_ID  # an answer of two tokens, then its EOS padding
    results = []
    for scored_at in (None, flagged_first(maskable)):
        model.zero_grad()
        loss = diffusion_loss(model, ids, rng(3), 63, objective, maskable, scored_at=scored_at)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("shifted", [False, True])
def test_rows_with_a_fixed_eos_padding_are_scored_as_if_alone(monkeypatch, shifted, block_size):
    """SFT rows with a fixed EOS padding end before the batch does: the columns after them are never attended to
    (whatever they hold), so each row's loss is the loss of the row alone, cut where it ends (every answer token
    masked, to compare)."""
    from model.config import ModelConfig
    from scripts.common.data.sft import SFTExamples, collate, flagged_first

    monkeypatch.setattr(
        "model.objectives.diffusion_loss.draw_masks",
        lambda objective, maskable, rng: (maskable, torch.ones(len(maskable), 1)),
    )
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = Transformer(config)
    model.config.logit_shift = shifted
    rows = [torch.randint(3, 60, (n,)) for n in (6, 11, 9)]
    for ids in rows:
        ids[-1] = EOS_ID  # the answer (last three tokens) closes with EOS
    answer = [torch.arange(len(ids)) >= len(ids) - 3 for ids in rows]
    examples = SFTExamples(
        torch.cat(rows).numpy().astype("uint16"),
        torch.cat(answer).numpy().astype("uint8"),
        torch.tensor([0, *torch.cumsum(torch.tensor([len(r) for r in rows]), 0)]).numpy(),
    )
    objective = DiffusionObjective(block_size=block_size, normalization="row", padding_weight=0.1)
    batch = collate(examples, range(3), "diffusion", eos_padding=2)
    assert batch["input_ids"].shape == (3, 13) and batch["real"].sum(1).tolist() == [8, 13, 11]
    together = diffusion_loss(model, batch["input_ids"], rng(), 63, objective, batch["maskable"],
                              scored_at=batch["scored_at"], real=batch["real"])  # fmt: skip
    alone = []
    for row in range(3):
        width = int(batch["real"][row].sum())
        ids, maskable = batch["input_ids"][row : row + 1, :width], batch["maskable"][row : row + 1, :width]
        scored_at = flagged_first(maskable) if block_size is None else None
        whole = torch.ones_like(maskable)
        alone.append(diffusion_loss(model, ids, rng(), 63, objective, maskable, scored_at=scored_at, real=whole))
    assert together.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)
    # The padding weight finds the padding by the PAD after it: compare the attention alone, with weight 1.
    plain = DiffusionObjective(block_size=block_size, normalization="row")
    ids, maskable, scored_at, real = (batch[k] for k in ("input_ids", "maskable", "scored_at", "real"))
    with_pad, with_junk = (
        diffusion_loss(model, x, rng(), 63, plain, maskable, scored_at=scored_at, real=real)
        for x in (ids, ids.masked_fill(~real, 7))
    )
    assert with_junk.item() == pytest.approx(with_pad.item(), rel=1e-5)
