"""LLaDA 2.0 pretraining objectives: noise schedules with ELBO time weights, attention masks (BD3LM 2L training
mask, block-causal inference mask, document mask for packed rows), the MDLM and block-diffusion (BDLM) losses,
and the warmup-stable-decay curriculum of the block size.

Maskable ids are those of model/diffusion.py (every real token incl. BOS/EOS, never PAD); the mask token is never
a target. Losses divide by the number of maskable tokens (invariant I1), so BDLM at block size = L equals MDLM.

Attention masks are boolean, True = may attend, broadcastable to [B, heads, T, S] (what Transformer takes).
They go through SDPA on CPU and CUDA. FlexAttention would avoid materialising the [T, S] mask on CUDA, but it needs
a hook in model/transformer.py's attention call; the masks here are built so a block-mask adapter can be added there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.diffusion import mask_tokens, masked_token_nll, pretraining_maskable
from model.errors import NanoLladaError
from model.tokenizer import PAD_ID

SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------- noise schedules


def mask_probability(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """1 - alpha(t): the probability that a token is masked at diffusion time t.

    linear: alpha = 1 - t (LLaDA, mask ratio = t); cosine: alpha = cos^2(pi t / 2) (mask ratio sin^2(pi t / 2)).
    """
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return torch.sin(math.pi * t / 2) ** 2
    raise NanoLladaError(f"unknown time-weight schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")


def elbo_weight(t: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """-alpha'(t) / (1 - alpha(t)), the continuous-time MDLM ELBO weight (MDLM Eq. 10) at the t that masked the row.

    linear: 1/t (LLaDA Eq. 3). cosine: (pi/2) sin(pi t) / sin^2(pi t/2) = pi cot(pi t / 2).
    Both give E[weight * #masked] = L for t ~ U(0, 1), so uniform logits still score ln|V| per token.
    """
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        return math.pi / torch.tan(math.pi * t / 2)
    raise NanoLladaError(f"unknown time-weight schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------- attention masks


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    """Block index of each position 0..length-1 (blocks start at position 0, as in training)."""
    return torch.arange(length, device=device) // block_size


def bd3lm_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] mask of the BD3LM input [x_t ; x_0] (section 3.6, rules B1), b = block of (i mod L):

    noisy -> noisy: same block; noisy -> clean: strictly earlier block; clean -> clean: same or earlier block;
    clean -> noisy: never. Every query sees at least itself.
    """
    if seq_len % block_size:
        raise NanoLladaError(f"block size {block_size} does not divide the sequence length {seq_len}")
    b = block_ids(seq_len, block_size, device).repeat(2)
    clean = torch.arange(2 * seq_len, device=device) >= seq_len
    q_b, k_b = b[:, None], b[None, :]
    q_clean, k_clean = clean[:, None], clean[None, :]
    noisy_noisy = ~q_clean & ~k_clean & (q_b == k_b)
    noisy_clean = ~q_clean & k_clean & (k_b < q_b)
    clean_clean = q_clean & k_clean & (k_b <= q_b)
    return noisy_noisy | noisy_clean | clean_clean


def block_causal_mask(block_of: torch.Tensor) -> torch.Tensor:
    """[T, T] inference mask from per-position block indices: query i sees key j iff block(j) <= block(i)."""
    return block_of[None, :] <= block_of[:, None]


def document_ids_with_pad(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """PAD positions (rows cut short by --variable-length-prob) become their own document (-1): real tokens never
    attend to padding, and PAD queries still have PAD keys to attend to (no empty row)."""
    return doc_ids.masked_fill(input_ids == PAD_ID, -1)


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: attend only within the same document (LLaDA 2.0 section 3.7 b). The diagonal is always True."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def bd3lm_document_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, 1, 2L, 2L]: the BD3LM rules AND the document rule (both halves carry the same document ids)."""
    L = doc_ids.shape[1]
    return bd3lm_attention_mask(L, block_size, doc_ids.device) & document_attention_mask(doc_ids.repeat(1, 2))


# ----------------------------------------------------------------------------- losses


def sample_time(batch_size: int, eps: float, rng: torch.Generator, device) -> torch.Tensor:
    """t ~ U(eps, 1 - eps) per sequence; eps keeps every ELBO weight finite."""
    return eps + (1 - 2 * eps) * torch.rand(batch_size, device=device, generator=rng)


def _weighted_loss(logits, input_ids, masked, weight, maskable) -> torch.Tensor:
    return (masked_token_nll(logits, input_ids, masked) * weight[:, None]).sum() / maskable.sum().clamp(min=1)


def mdlm_loss(
    model,
    input_ids: torch.Tensor,
    rng: torch.Generator,
    mask_id: int,
    eps: float = 1e-3,
    schedule: str = "linear",
    doc_ids: torch.Tensor | None = None,
    maskable: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked diffusion over the whole row (LLaDA Eq. 3, LLaDA 2.0 Eq. 2), weighted by elbo_weight(t).

    With schedule "linear" and no doc_ids it draws the same masks as model.diffusion.llada_loss and equals it.
    doc_ids [B, L] restrict attention to each token's own document.
    """
    maskable = pretraining_maskable(input_ids) if maskable is None else maskable
    t = sample_time(input_ids.shape[0], eps, rng, input_ids.device) if t is None else t
    noisy, masked = mask_tokens(input_ids, maskable, mask_probability(t, schedule), mask_id, rng)
    attention = (
        "bidirectional" if doc_ids is None else document_attention_mask(document_ids_with_pad(input_ids, doc_ids))
    )
    logits = model(noisy, attention=attention)
    return _weighted_loss(logits, input_ids, masked, elbo_weight(t, schedule), maskable)


def bdlm_forward(
    model, noisy: torch.Tensor, clean: torch.Tensor, block_size: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of the noisy half of the BD3LM input [x_t ; x_0] (positions 0..L-1 for both halves)."""
    B, L = clean.shape
    positions = torch.arange(L, device=clean.device).repeat(2)
    if doc_ids is None:
        attention = bd3lm_attention_mask(L, block_size, clean.device)
    else:
        attention = bd3lm_document_mask(document_ids_with_pad(clean, doc_ids), block_size)
    return model(torch.cat([noisy, clean], dim=1), attention=attention, positions=positions)[:, :L]


def bdlm_loss(
    model,
    input_ids: torch.Tensor,
    rng: torch.Generator,
    mask_id: int,
    block_size: int,
    eps: float = 1e-3,
    schedule: str = "linear",
    doc_ids: torch.Tensor | None = None,
    maskable: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block diffusion (BD3LM, LLaDA 2.0 Eq. 1): every block is noised at the row's t and denoised from itself plus
    the clean earlier blocks, in one forward pass over [x_t ; x_0]. Same weighting and normalisation as mdlm_loss,
    so at block_size = L the two agree for the same masks (invariant B2).
    """
    maskable = pretraining_maskable(input_ids) if maskable is None else maskable
    t = sample_time(input_ids.shape[0], eps, rng, input_ids.device) if t is None else t
    noisy, masked = mask_tokens(input_ids, maskable, mask_probability(t, schedule), mask_id, rng)
    logits = bdlm_forward(model, noisy, input_ids, block_size, doc_ids)
    return _weighted_loss(logits, input_ids, masked, elbo_weight(t, schedule), maskable)


# ----------------------------------------------------------------------------- WSD block-size curriculum

WARMUP, STABLE, DECAY = "warmup", "stable", "decay"


def default_sizes_up(seq_len: int) -> list[int]:
    """1, 4, 16, 64 (those below L that divide it), then L."""
    return [s for s in (1, 4, 16, 64) if s < seq_len and seq_len % s == 0] + [seq_len]


def default_sizes_down(seq_len: int, inference_block_size: int = 32) -> list[int]:
    """L, L/2, L/4, ... while the half divides evenly and stays >= the inference block size (LLaDA 2.0 decays to 32)."""
    sizes = [seq_len]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= inference_block_size:
        sizes.append(sizes[-1] // 2)
    return sizes


@dataclass(frozen=True)
class BlockCurriculum:
    """LLaDA 2.0's warmup-stable-decay of the block size (not of the LR): a pure function of the optimizer step.

    warmup: BDLM through sizes_up (each size an equal share of the phase); stable: MDLM on the whole row (block = L);
    decay: BDLM through sizes_down, ending at the inference block size.
    """

    seq_len: int
    total_steps: int
    sizes_up: tuple[int, ...]
    sizes_down: tuple[int, ...]
    phase_ratios: tuple[float, float, float] = (0.3, 0.5, 0.2)

    def __post_init__(self) -> None:
        for name, sizes in (("--wsd-block-sizes-up", self.sizes_up), ("--wsd-block-sizes-down", self.sizes_down)):
            if not sizes:
                raise NanoLladaError(f"{name} is empty; give at least one block size")
            bad = [s for s in sizes if s <= 0 or self.seq_len % s]
            if bad:
                raise NanoLladaError(
                    f"{name}: block size(s) {bad} do not divide --seq-len {self.seq_len}; "
                    f"use divisors of {self.seq_len} (e.g. {default_sizes_up(self.seq_len)})"
                )
        if any(a > b for a, b in zip(self.sizes_up, self.sizes_up[1:])):
            raise NanoLladaError(f"--wsd-block-sizes-up must not decrease, got {list(self.sizes_up)}")
        if any(a < b for a, b in zip(self.sizes_down, self.sizes_down[1:])):
            raise NanoLladaError(f"--wsd-block-sizes-down must not increase, got {list(self.sizes_down)}")
        if len(self.phase_ratios) != 3 or min(self.phase_ratios) < 0 or abs(sum(self.phase_ratios) - 1) > 1e-6:
            raise NanoLladaError(
                f"--wsd-phase-ratios must be three non-negative numbers summing to 1, got {list(self.phase_ratios)}"
            )

    @property
    def inference_block_size(self) -> int:
        return self.sizes_down[-1]

    def boundaries(self) -> tuple[int, int]:
        """First step of the stable phase and first step of the decay phase."""
        warmup, stable, _ = self.phase_ratios
        return round(warmup * self.total_steps), round((warmup + stable) * self.total_steps)

    def at(self, step: int) -> tuple[str, int]:
        """(phase, block size) at optimizer step `step` (0-based)."""
        stable_start, decay_start = self.boundaries()
        if step < stable_start:
            return WARMUP, self.sizes_up[len(self.sizes_up) * step // stable_start]
        if step < decay_start or decay_start >= self.total_steps:
            return STABLE, self.seq_len
        span = self.total_steps - decay_start
        return DECAY, self.sizes_down[
            min(len(self.sizes_down) * (step - decay_start) // span, len(self.sizes_down) - 1)
        ]


def trained_block_size(extra: dict) -> int | None:
    """Block size a checkpoint decodes with block-causally, or None for a bidirectional (MDLM) model.

    Read from an explicit {"block_diffusion": {"block_size": K}} entry (merged or SFT checkpoints), else from the
    stored curriculum at the checkpoint's step: a checkpoint saved during warmup or decay was trained as a BDLM
    with that step's block size; one saved in the stable phase is a plain MDLM.
    """
    explicit = extra.get("block_diffusion") or {}
    if explicit.get("block_size"):
        return int(explicit["block_size"])
    stored = (extra.get("diffusion") or {}).get("block_curriculum")
    if not stored or not extra.get("step"):
        return None
    curriculum = BlockCurriculum(
        stored["seq_len"],
        stored["total_steps"],
        tuple(stored["sizes_up"]),
        tuple(stored["sizes_down"]),
        tuple(stored["phase_ratios"]),
    )
    phase, block_size = curriculum.at(int(extra["step"]) - 1)  # the last step the weights were trained at
    return None if phase == STABLE else block_size
