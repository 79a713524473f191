"""Losses and estimators pinned on non-uniform models whose expectations have a closed form. Uniform logits give
ln|V| for any self-normalised mean, with or without the ELBO weight, so they cannot pin it; these models can."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.cross_entropy import logits_or_nll
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.schedule import NoiseSchedule
from model.transformer import Transformer

V, MASK = 101, 100


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


class Tokenwise(nn.Module):
    """A model whose output at a position reads that position's token alone (an embedding and a head): a loss over
    it changes only when a scored position's token or mask changes."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 16), nn.Linear(16, vocab)

    def forward(self, ids, attention="bidirectional", logits_at=None, targets=None, **_):
        logits = self.head(self.embed(ids))
        if isinstance(logits_at, torch.Tensor) and logits_at.dim() == 2:
            logits = logits.gather(1, logits_at[..., None].expand(-1, -1, logits.shape[-1]))
        elif logits_at is not None:
            logits = logits[:, logits_at]
        return logits_or_nll(logits, targets)


@pytest.mark.parametrize(
    "objective",
    [
        DiffusionObjective(),
        DiffusionObjective(NoiseSchedule("cosine"), 0.3, 0.8, 4, "row", complementary=True, cap_weight=2.0),
    ],
    ids=["llada", "blocks-complementary-cap"],
)
def test_sft_loss_trains_the_answer_only(tiny_config, objective):
    """The prompt is clean context: never masked, never scored. Over a model that reads each position alone, the
    loss does not move when the prompt's tokens change, and only the mask token's input row gets a gradient."""
    model = Tokenwise()
    ids = torch.randint(1, 50, (2, 14), generator=rng())
    ids[:, 5:] += 50  # prompt tokens in [1, 50), answer tokens in [51, 100): their embedding rows are disjoint
    maskable = torch.arange(14)[None, :].repeat(2, 1) >= 5
    loss = diffusion_loss(model, ids, rng(1), MASK, objective, maskable)
    loss.backward()
    grad = model.embed.weight.grad.abs().sum(1)
    assert torch.isfinite(loss) and grad[MASK] > 0 and grad[:MASK].sum() == 0
    other_prompt = ids.clone()
    other_prompt[:, :5] = torch.randint(1, 50, (2, 5), generator=rng(3))
    assert diffusion_loss(model, other_prompt, rng(1), MASK, objective, maskable).item() == loss.item()
    transformer = Transformer(tiny_config)  # and the real model trains through the answer
    diffusion_loss(transformer, ids, rng(1), tiny_config.vocab_size - 1, objective, maskable).backward()
    assert transformer.model.embed_tokens.weight.grad.abs().sum() > 0


class ContextOracle(nn.Module):
    """A model whose confidence grows with the row's context: at every position of a row with k of its n tokens
    masked, the true token gets logit 4 (n - k) / n and every other one 0. Its NLL at a masked position depends on
    k alone, so each estimator's expectation has a closed form, and it is not ln|V| (uniform logits would give that
    for any self-normalised mean, with or without the 1/t weight)."""

    def __init__(self, clean: torch.Tensor, vocab: int = 6):
        super().__init__()
        self.clean, self.vocab, self.anchor = clean, vocab, nn.Parameter(torch.zeros(()))

    def forward(self, ids, attention="bidirectional", targets=None, **_):
        n = self.clean.shape[1]
        confidence = 4.0 * (n - (ids == self.vocab - 1).sum(1, keepdim=True)) / n  # [B, 1]
        logits = torch.zeros(*ids.shape, self.vocab) + self.anchor
        return logits_or_nll(logits.scatter(-1, self.clean[..., None], confidence.expand_as(ids)[..., None]), targets)

    def nll(self, k: int) -> float:
        """-log p(true token) at a masked position when k of the row's n tokens are masked."""
        confidence = 4.0 * (self.clean.shape[1] - k) / self.clean.shape[1]
        return math.log(self.vocab - 1 + math.exp(confidence)) - confidence


def expected_nelbo_per_token(oracle: ContextOracle, scored: int, draw: str) -> float:
    """The expectation of (weight) x sum over masked positions of NLL / scored, for a row whose `scored` positions
    may be masked. Count draw: l ~ U{1..n} masked, weight n / l, so the mean of NLL(l) over l. Time draw over
    t ~ U(t_min, t_max): given t the count k is Binomial(n, t), and (1/t) k C(n, k) t^k (1 - t)^(n - k) =
    n C(n-1, k-1) t^(k-1) (1 - t)^(n - k), a polynomial in t integrated by Simpson's rule (exact to ~1e-12)."""
    n = scored
    if draw == "count":
        return sum(oracle.nll(k) for k in range(1, n + 1)) / n
    t_min, t_max = DiffusionObjective.t_min, DiffusionObjective.t_max  # the defaults: LLaDA's U(0, 1], weights finite
    t = torch.linspace(t_min, t_max, 20001, dtype=torch.float64)
    simpson = torch.ones_like(t)
    simpson[1:-1:2], simpson[2:-1:2] = 4, 2
    total = 0.0
    for k in range(1, n + 1):
        density = n * math.comb(n - 1, k - 1) * t ** (k - 1) * (1 - t) ** (n - k)
        integral = (density * simpson).sum().item() * (t[1] - t[0]).item() / 3 / (t_max - t_min)
        total += integral * oracle.nll(k)
    return total / n


@pytest.mark.parametrize("estimator", ["loss-time", "loss-count", "nelbo-time", "nelbo-count"])
def test_every_diffusion_estimator_has_the_nelbo_as_expectation_for_a_non_uniform_model(estimator):
    """The 1/t weight (or the count draw's n/l) is what makes the estimate the NELBO; a loss that drops it, or a
    mean normalised by its own weights, lands elsewhere here (0.78 nats/token expected; uniform logits give 1.79).
    nelbo-time is the evaluation's i.i.d. estimator, nelbo-count eval_lm's exact-count one (token 0 is context)."""
    from model.inference.likelihood import diffusion_nelbo, diffusion_nelbo_rows
    from scripts.common.evaluation.lm_scores import scored_positions

    vocab, n, rows = 6, 8, 256
    clean = torch.randint(1, vocab - 1, (rows, n), generator=rng(0))
    oracle = ContextOracle(clean, vocab)
    draw = estimator.split("-")[1]
    if estimator == "nelbo-time":
        mean, stderr = diffusion_nelbo(oracle, clean, vocab - 1, 64, rng(1))
    elif estimator == "nelbo-count":
        scored = scored_positions(clean)
        terms = diffusion_nelbo_rows(oracle, clean, scored, vocab - 1, 64, rng(1))  # [draws, rows]
        values = terms.sum(1) / scored.sum()
        mean, stderr = values.mean().item(), values.std().item() / math.sqrt(len(values))
    else:
        objective = DiffusionObjective(mask_draw=draw)
        values = torch.tensor([diffusion_loss(oracle, clean, rng(s), vocab - 1, objective).item() for s in range(64)])
        mean, stderr = values.mean().item(), values.std().item() / math.sqrt(len(values))
    expected = expected_nelbo_per_token(oracle, n - 1 if estimator == "nelbo-count" else n, draw)
    assert 0 < stderr < 0.02 and abs(mean - expected) < 4 * stderr
    assert abs(expected - math.log(vocab)) > 0.5  # far from what uniform logits give


def test_the_late_heavy_time_density_keeps_the_nelbo_and_the_all_masked_rows_mix_in_the_first_step():
    """late_time_share draws half the rows' t from [0.9, 1) and importance-weights every row: the same NELBO as t ~ U
    (closed form above). all_masked_share trains that share of rows at t = 1 with weight 1: its expectation is the
    mixture (1 - share) NELBO + share NLL(all n masked), which this model puts 0.24 nats/token above the NELBO."""
    vocab, n, rows = 6, 8, 256
    clean = torch.randint(1, vocab - 1, (rows, n), generator=rng(0))
    oracle = ContextOracle(clean, vocab)
    nelbo = expected_nelbo_per_token(oracle, n, "time")
    expected = {"late": nelbo, "all_masked": 0.5 * nelbo + 0.5 * oracle.nll(n)}
    objectives = {
        "late": DiffusionObjective(late_time_share=0.5),
        "all_masked": DiffusionObjective(all_masked_share=0.5),
    }
    assert abs(expected["all_masked"] - nelbo) > 0.2
    for name, objective in objectives.items():
        values = torch.tensor([diffusion_loss(oracle, clean, rng(s), vocab - 1, objective).item() for s in range(64)])
        mean, stderr = values.mean().item(), values.std().item() / math.sqrt(len(values))
        assert 0 < stderr < 0.03 and abs(mean - expected[name]) < 4 * stderr, name


def test_the_label_share_is_the_first_answer_tokens_part_of_the_logit_gradient():
    """label_gradient_share against the gradient itself: with a model whose logits are free parameters, the share of
    sum_j |dloss/dlogits_j| (L1, exactly 2 (1 - p_j) weight_j for softmax cross-entropy) at each row's first
    supervised position; for AR and diffusion alike (all-masked rows, so every answer position is scored)."""
    from model.objectives.ar_loss import label_gradient_share, next_token_loss

    logits = torch.randn(3, 7, V, generator=rng(4))

    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(logits.clone())

        def forward(self, ids, attention=None, logits_at=None, targets=None, **_):
            return logits_or_nll(self.logits, targets)

    ids = torch.randint(1, MASK, (3, 7), generator=rng(5))
    answer = torch.arange(7)[None, :].repeat(3, 1) >= torch.tensor([[3], [4], [2]])
    for route in ("ar", "diffusion"):
        model, stats = Free(), {}
        if route == "ar":
            labels = ids.masked_fill(~answer, -100)
            loss = next_token_loss(model, ids, labels, stats=stats)
            supervised = F.pad(answer[:, 1:], (0, 1), value=False)  # position t predicts t + 1
        else:
            objective = DiffusionObjective(normalization="row", all_masked_share=1.0)
            loss = diffusion_loss(model, ids, rng(6), MASK, objective, answer, stats=stats)
            supervised = answer
        loss.backward()
        size = model.logits.grad.abs().sum(-1)
        first = supervised & (supervised.long().cumsum(1) == 1)
        assert stats["label_share"].item() == pytest.approx(((size * first).sum() / size.sum()).item(), rel=1e-4), route
    nll, weight = torch.tensor([[0.5, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    share = label_gradient_share(nll, weight, torch.ones(1, 3, dtype=torch.bool))
    assert share.item() == pytest.approx((1 - math.exp(-0.5)) / (2 - math.exp(-0.5) - math.exp(-2.0)))
