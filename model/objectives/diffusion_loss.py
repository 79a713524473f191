"""The masked-diffusion loss: one estimator, with LLaDA 1.0, MDLM, BD3LM and LLaDA 2.0 as settings of it.

    loss = sum over masked positions j of w(t) * c_j * CE_j / sum over maskable positions of c_j

t ~ U(t_min, t_max) per row, each maskable token masked independently with probability 1 - alpha(t), w(t) the ELBO
weight of the schedule (1/t for LLaDA's linear schedule), c_j a per-token weight (1, or a smaller weight for SFT's
EOS padding). Since E[w(t) * P(masked)] = 1, the estimate is unbiased for the NELBO per (weighted) token: with
uniform logits it averages ln|V| for any row or answer length, schedule and block structure.

- normalization "batch": one ratio over the whole batch (pretraining; LLaDA Eq. 3);
  "row": the ratio per row, then the mean over rows (LLaDA SFT: each sample divided by its answer length A_b).
- block_size None: the noisy row is denoised with bidirectional attention. block_size K: block diffusion (BD3LM,
  LLaDA 2.0 Eq. 1 and 5) on [x_t ; x_0], each block denoised from itself plus the clean earlier blocks.
- SFT is the same loss with a clean prompt: pass `maskable` = the answer and its EOS padding.
- A logit-shifted model (converted from AR, model/logit_shift.py) predicts position j at j - 1, so its row's
  first token is never masked or scored. position_masking > 0 gives each position of a block its own schedule
  (model.objectives.masking.position_rates, warped_time): later positions masked more often, weighted to stay unbiased.
- ar_loss_weight w > 0 (joint training, one checkpoint that decodes both ways): + w times the same weighted mean with
  each token scored by the same weights under causal attention (model.objectives.ar_loss.weighted_next_token_loss),
  one more forward of the L clean tokens. A shifted model only: its head is the AR head, so the two terms agree on
  what each output predicts. w = 0 runs no extra forward and is today's loss, bit for bit.
- A prompt-causal model (model/prompt_causal.py) reads the prompt before the answer causally; when it is also
  shifted, the answer's first token is scored on every row with weight 1 (its exact term) and the other terms are
  weighted by denoising_weight (1: the NELBO; below 1 gives the exact term more of the gradient, not an ELBO).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from model.block_attention import bdlm_forward, document_attention_mask, document_ids_with_pad, pad_to_blocks
from model.cross_entropy import IGNORE_INDEX, logits_or_nll
from model.errors import NanoLladaError
from model.logit_shift import is_shifted, predictable, read_shifted
from model.objectives.ar_loss import label_gradient_share, weighted_next_token_loss
from model.objectives.decoding_terms import cap_loss, repeat_unlikelihood
from model.objectives.masking import (
    bernoulli_masks,
    check_time_range,
    eos_padding,
    exact_count_draws,
    late_heavy_time,
    position_rates,
    pretraining_maskable,
    sample_time,
    warped_time,
)
from model.objectives.schedule import LINEAR, NoiseSchedule, check_schedule
from model.prompt_causal import answer_starts, exact_first_token, is_prompt_causal, prompt_causal_mask

NORMALIZATIONS = ("batch", "row")
MASK_DRAWS = ("time", "count")


@dataclass(frozen=True)
class DiffusionObjective:
    """The settings of diffusion_loss. The defaults are LLaDA 1.0 pretraining (Eq. 3)."""

    schedule: NoiseSchedule = LINEAR  # alpha(t): linear (mask ratio t, weight 1/t) or cosine
    t_min: float = 1e-3
    t_max: float = 1 - 1e-3
    block_size: int | None = None  # None: bidirectional over the row; K: block diffusion with blocks of K
    normalization: str = "batch"  # batch | row (see the module docstring)
    padding_weight: float = 1.0  # c_j of SFT's EOS padding; 1 is LLaDA's answer length including the padding
    complementary: bool = False  # each row twice: a mask at t and its complement at 1 - t (LLaDA 2.0)
    cap_weight: float = 0.0  # lambda of the confidence-aware (CAP, dParallel) term
    repeat_penalty_weight: float = 0.0  # weight of the repeat unlikelihood term
    # The strength of position-dependent masking (0: off; model.objectives.masking.position_rates).
    position_masking: float = 0.0
    mask_draw: str = "time"  # time: t ~ U, Bernoulli(t) masks, weight w(t); count: l ~ U{1..n} masks, weight n/l
    # The time density (model.objectives.masking.late_heavy_time): this share of rows draws t ~ U(late_time_from,
    # t_max) instead, every row importance-weighted: the same NELBO, t near 1 more often. 0: t ~ U(t_min, t_max).
    late_time_share: float = 0.0
    late_time_from: float = 0.9
    # This share of rows is trained at t = 1 (every maskable position masked, weight 1), the canvas decoding starts
    # from: a mixture of the NELBO and that step's loss, not an ELBO unless 0 (both are minimised by the data's
    # conditionals, so the mixture has the NELBO's minimiser).
    all_masked_share: float = 0.0
    ar_loss_weight: float = 0.0  # joint training: + this weight times the causal next-token loss (0: off)
    # A prompt-causal shifted model: the weight of every term but the first answer token's exact one (1: the NELBO).
    denoising_weight: float = 1.0

    def check_mask_draw(self) -> None:
        """The count draw is the linear schedule's estimator with the weight averaged over t given the mask: one
        time for the whole row, over (0, 1), so it refuses what changes either."""
        if self.mask_draw not in MASK_DRAWS:
            raise NanoLladaError(f"mask_draw must be one of {', '.join(MASK_DRAWS)}, got '{self.mask_draw}'")
        if self.mask_draw == "count" and (
            self.schedule != LINEAR
            or self.complementary
            or self.position_masking
            or (self.t_min, self.t_max) != (DiffusionObjective.t_min, DiffusionObjective.t_max)  # the defaults
        ):
            raise NanoLladaError(
                "the count mask draw is LLaDA's linear-schedule estimator over the whole (0, 1) time range: it does "
                "not combine with a cosine schedule, a mask-ratio band, complementary or position-dependent masking"
            )

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if self.normalization not in NORMALIZATIONS:
            raise NanoLladaError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, got '{self.normalization}'"
            )
        if self.block_size is not None and self.block_size <= 0:
            raise NanoLladaError(f"block_size must be > 0, got {self.block_size}")
        if not 0 <= self.padding_weight <= 1:
            raise NanoLladaError(f"padding_weight must lie in [0, 1], got {self.padding_weight}")
        check_time_range(self.t_min, self.t_max)
        if self.position_masking < 0:
            raise NanoLladaError(f"position_masking must be >= 0, got {self.position_masking}")
        if self.position_masking and self.complementary:
            raise NanoLladaError(
                "position_masking and complementary masking do not combine: the complement of a position-dependent "
                "mask is not a mask of the same process at another time"
            )
        self.check_mask_draw()
        self.check_time_density()
        if self.ar_loss_weight < 0:
            raise NanoLladaError(f"ar_loss_weight must be >= 0, got {self.ar_loss_weight}")
        if not 0 < self.denoising_weight <= 1:
            raise NanoLladaError(f"denoising_weight must lie in (0, 1], got {self.denoising_weight}")

    def check_time_density(self) -> None:
        if not 0 <= self.late_time_share < 1:
            raise NanoLladaError(f"late_time_share must lie in [0, 1), got {self.late_time_share}")
        if self.late_time_share and not self.t_min < self.late_time_from < self.t_max:
            raise NanoLladaError(
                f"late_time_from must lie inside the time range ({self.t_min}, {self.t_max}), got {self.late_time_from}"
            )
        if not 0 <= self.all_masked_share <= 1:
            raise NanoLladaError(f"all_masked_share must lie in [0, 1], got {self.all_masked_share}")
        if (self.late_time_share or self.all_masked_share) and (self.complementary or self.position_masking):
            raise NanoLladaError(
                "a late-heavy time density or all-masked rows do not combine with complementary or position-dependent "
                "masking (the pair or the warp fixes how each row's time is drawn)"
            )
        if self.late_time_share and self.mask_draw == "count":
            raise NanoLladaError("a late-heavy time density needs the time draw (mask_draw 'time'), not the count draw")


def masked_token_nll(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-position fp32 cross-entropy at masked positions, 0 elsewhere (with no gradient to their logits).

    Scores every position with ignore_index instead of gathering the masked rows: `logits[masked]` has a
    data-dependent shape, which syncs the GPU with the host and breaks torch.compile graphs.
    """
    return logits_or_nll(logits, targets.masked_fill(~masked, IGNORE_INDEX))  # chunked on eager CUDA


def masked_nll_sums(
    model, clean, masked, weights, mask_id: int, block_size=None, keys=None, answer_start=0
) -> torch.Tensor:
    """Per-row sums of weights * NLL over the masked positions, float64 [N]: what every diffusion ELBO estimator sums
    (the evaluations' NELBO and likelihoods, and DPO's answer scores). keys [N, T] (optional): the positions a row
    may attend to (right padding of rows of unequal length). answer_start (an int or [N]): where each row's prompt
    ends, for a prompt-causal model (model/prompt_causal.py); a shifted one scores that first answer token on every
    row with weight 1, its exact term, whatever the draw (the same expectation, less variance)."""
    noisy = clean.masked_fill(masked, mask_id)
    if block_size is None and is_prompt_causal(model) and is_shifted(model):
        masked, weights = exact_first_token(answer_start, masked, weights)
    if block_size is not None:
        logits = bdlm_forward(model, noisy, clean, block_size)
    else:
        if is_prompt_causal(model):
            attention = prompt_causal_mask(answer_start, clean.shape[1], keys, clean.device)
        else:
            attention = "bidirectional" if keys is None else keys[:, None, None, :]
        logits = model(noisy, attention=attention)
        logits = read_shifted(logits) if is_shifted(model) else logits
    return (masked_token_nll(logits, clean, masked).double() * weights).sum(1)


def scored_nll(forward, targets: torch.Tensor, masked: torch.Tensor, shifted: bool, need_logits: bool):
    """(fp32 NLL [B, L] of the masked positions, 0 elsewhere; the logits when a loss term needs them, else None).

    forward(targets=...) is the model call: with targets it returns their NLL computed inside the model's forward,
    where a compiled model fuses it with the head. `shifted`: output j predicts position j + 1 (a logit-shifted
    model over whole rows), so the targets move one left and the NLL back one right, [B, L] copies where shifting
    the logits would copy [B, L, V]. Position 0, never masked in a shifted model, scores 0 as before.
    """
    if need_logits:
        logits = forward(targets=None)
        logits = read_shifted(logits) if shifted else logits
        return masked_token_nll(logits, targets, masked), logits
    ignored = targets.masked_fill(~masked, IGNORE_INDEX)
    if not shifted:
        return forward(targets=ignored), None
    nll = forward(targets=F.pad(ignored[:, 1:], (0, 1), value=IGNORE_INDEX))
    return F.pad(nll[:, :-1], (1, 0)), None


def draw_masks(
    objective: DiffusionObjective, maskable: torch.Tensor, rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, ELBO weight) of each noisy row, [N, L] and [N, L] or [N, 1]: one row per input row, or, with
    complementary masking, the batch twice over (m at t, then its complement at 1 - t).

    The count draw masks exactly l ~ U{1..n} of a row's n maskable positions, uniformly, weighted n / l. Bernoulli(t)
    masks with t ~ U(0, 1) mask a count uniform on 0..n, uniformly placed, and given the count l the 1/t weight
    averages (n + 1) / l: the count draw is the linear-schedule loss with the weight replaced by that average (LLaDA's
    Algorithm 3 estimator). Same expectation, less variance: the weight is at most n instead of 1 / t_min. A row with
    nothing maskable gets weight 0.
    """
    o, rows, device = objective, maskable.shape[0], maskable.device
    if o.mask_draw == "count":
        masked, weight = exact_count_draws(maskable, 1, rng)
        return with_all_masked(o, maskable, masked[0], weight[0, :, :1].float(), rng)
    if o.late_time_share:
        t, importance = late_heavy_time(rows, rng, device, o.t_min, o.t_max, o.late_time_share, o.late_time_from)
    else:
        t, importance = sample_time(rows, rng, device, o.t_min, o.t_max), 1.0
    probability, weight = o.schedule.mask_probability(t)[:, None], (o.schedule.elbo_weight(t) * importance)[:, None]
    if o.position_masking:
        rates = position_rates(maskable.shape[1], o.block_size, o.position_masking, device)
        tau, slope = warped_time(t[:, None], rates)
        probability, weight = o.schedule.mask_probability(tau), o.schedule.elbo_weight(tau) * slope
    masked = bernoulli_masks(maskable, probability, rng)
    if not o.complementary:
        return with_all_masked(o, maskable, masked, weight, rng)
    return torch.cat([masked, maskable & ~masked]), torch.cat([weight, o.schedule.elbo_weight(1 - t)[:, None]])


def with_all_masked(objective: DiffusionObjective, maskable, masked, weight, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """The all_masked_share of rows replaced by the all-masked canvas, weight 1 (its tokens' plain mean)."""
    if not objective.all_masked_share:
        return masked, weight
    start = torch.rand(maskable.shape[0], 1, device=maskable.device, generator=rng) < objective.all_masked_share
    return torch.where(start, maskable, masked), torch.where(start, 1.0, weight)


def token_weights(objective: DiffusionObjective, input_ids: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """c_j: 1 on maskable tokens, padding_weight on SFT's EOS padding, 0 elsewhere (float [B, L])."""
    weights = maskable.float()
    if objective.padding_weight != 1.0:
        weights = weights.masked_fill(eos_padding(input_ids, maskable), objective.padding_weight)
    return weights


def diffusion_loss(
    model,
    input_ids: torch.Tensor,
    rng: torch.Generator,
    mask_id: int,
    objective: DiffusionObjective = DiffusionObjective(),
    maskable: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    scored_at: torch.Tensor | None = None,
    real: torch.Tensor | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """The scalar loss of one batch input_ids [B, L] (see the module docstring).

    maskable [B, L]: positions that may be masked and are scored (default: every non-PAD token); the rest is clean
    context. doc_ids [B, L]: restrict attention to each token's own document (packed pretraining rows).
    real [B, L]: the columns that belong to their row (SFT rows with a fixed EOS padding end before the batch does);
    the others are never attended to. None: every column.
    scored_at [B, K]: positions that include every maskable one (the SFT batcher lists each row's answer and its
    padding, then unmaskable positions); the head then runs only there (not with blocks or the repeat penalty,
    which read neighbouring positions). Same loss: a prompt position is never masked, so never scored.
    stats: a dict that receives "label_share", the first answer token's share of the gradient (label_gradient_share).
    """
    shifted, prompt_causal = is_shifted(model), is_prompt_causal(model)
    span = pretraining_maskable(input_ids) if maskable is None else maskable
    answer_start, maskable = answer_starts(span), predictable(span, shifted)
    check_prompt_causal(objective, prompt_causal, shifted, doc_ids)
    if objective.ar_loss_weight:  # the causal term scores the rows as given, before any padding or repetition
        check_joint(shifted)
        clean = (input_ids, token_weights(objective, input_ids, maskable), doc_ids)
    if objective.block_size is not None:
        # LLaDA's maskable EOS padding; for rows that end before the batch does (`real`: SFT with a fixed padding),
        # PAD outside every row. Pretraining rows already have a length the block sizes divide.
        if real is None:
            input_ids, maskable = pad_to_blocks(input_ids, maskable, objective.block_size, with_eos=True)
        else:
            input_ids, maskable, real = pad_to_blocks(input_ids, maskable, objective.block_size, real)
    masked, elbo = draw_masks(objective, maskable, rng)
    if objective.complementary:
        input_ids, maskable = input_ids.repeat(2, 1), maskable.repeat(2, 1)
        doc_ids, scored_at, real = (None if x is None else x.repeat(2, 1) for x in (doc_ids, scored_at, real))
        answer_start = answer_start.repeat(2)
    noisy = input_ids.masked_fill(masked, mask_id)
    if prompt_causal and shifted:  # the other terms weighted, the first answer token's exact one at 1
        masked, elbo = exact_first_token(answer_start, masked, elbo * objective.denoising_weight)
    weights = token_weights(objective, input_ids, maskable)
    total_weight = weights.sum(1) if objective.normalization == "row" else weights.sum()
    if objective.block_size is not None:
        if doc_ids is None and real is not None:
            doc_ids = real.long() - 1  # the row is one document; the columns after it, PAD, are their own
        forward, row_shift = partial(bdlm_forward, model, noisy, input_ids, objective.block_size, doc_ids), False
    else:
        if prompt_causal:  # never with doc_ids (check_prompt_causal)
            attention = prompt_causal_mask(answer_start, input_ids.shape[1], real)
        else:
            attention = bidirectional_attention(input_ids, doc_ids, real)
        forward, row_shift = partial(model, noisy, attention=attention), shifted
        if scored_at is not None and not objective.repeat_penalty_weight:  # the head only where scored
            logits_at = (scored_at - 1).clamp(min=0) if shifted else scored_at  # shifted: j is read at j - 1
            forward, row_shift = partial(model, noisy, attention=attention, logits_at=logits_at), False
            input_ids, masked, weights = (x.gather(1, scored_at) for x in (input_ids, masked, weights))
            elbo = elbo if elbo.shape[1] == 1 else elbo.gather(1, scored_at)
    need_logits = bool(objective.cap_weight or objective.repeat_penalty_weight)
    nll, logits = scored_nll(forward, input_ids, masked, row_shift, need_logits)
    scored = nll * elbo * weights
    if objective.normalization == "batch":
        loss = scored.sum() / total_weight.clamp(min=1e-6)
    else:
        loss = (scored.sum(1) / total_weight.clamp(min=1e-6)).mean()
    if stats is not None:  # each position's factor in the loss; the row normalisation's mean over rows is common
        factor = elbo * weights * masked / (total_weight if total_weight.dim() == 0 else total_weight[:, None])
        stats["label_share"] = label_gradient_share(nll, factor.clamp(min=0), weights > 0)
    if objective.cap_weight:
        loss = loss + objective.cap_weight * cap_loss(logits, input_ids, masked)
    if objective.repeat_penalty_weight:
        loss = loss + objective.repeat_penalty_weight * repeat_unlikelihood(logits, input_ids, masked)
    if objective.ar_loss_weight:
        row = objective.normalization == "row"
        loss = loss + objective.ar_loss_weight * weighted_next_token_loss(model, clean[0], clean[1], row, clean[2])
    return loss


def check_prompt_causal(objective: DiffusionObjective, prompt_causal: bool, shifted: bool, doc_ids) -> None:
    """A prompt needs rows of one document without blocks; denoising_weight weighs against the exact first term."""
    if prompt_causal and (objective.block_size is not None or doc_ids is not None):
        raise NanoLladaError(
            "a prompt-causal model is trained on one prompt and answer per row without block diffusion: drop "
            "--prompt-causal, or --block-size"
        )
    if objective.denoising_weight != 1 and not (prompt_causal and shifted):
        raise NanoLladaError(
            "--denoising-weight weighs the answer's terms against the exact first-token term of a prompt-causal, "
            "logit-shifted model: pass --prompt-causal on a shifted model, or leave the weight at 1"
        )


def check_joint(shifted: bool) -> None:
    """Joint training needs the logit shift: unshifted, the head would predict position j at j under diffusion and
    position j + 1 at j under causal attention, two meanings for one output."""
    if not shifted:
        raise NanoLladaError(
            "ar_loss_weight > 0 trains the same head as the AR model, which needs a logit-shifted model: pass "
            "--logit-shift (the default when converting with --init-from-minimind)"
        )


def bidirectional_attention(input_ids: torch.Tensor, doc_ids: torch.Tensor | None, real: torch.Tensor | None):
    """Each token's own document (a dense [B, 1, L, L] mask), or every column of its row (a key mask [B, 1, 1, L]:
    one row for all queries, which keeps SDPA's fused kernels), or everything."""
    if doc_ids is not None:
        return document_attention_mask(document_ids_with_pad(input_ids, doc_ids))
    return "bidirectional" if real is None else real[:, None, None, :]
