"""Attention masks of block diffusion and packed documents, and the forward pass over [x_t ; x_0].

Masks are boolean, True = may attend, broadcastable to [B, heads, T, S] (what Transformer takes). On CUDA
training the transformer serves them through FlexAttention; elsewhere through SDPA.
Blocks start at position 0 of the row (a prompt included), in training and at inference alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from model.errors import NanoLladaError
from model.logit_shift import is_shifted
from model.tokenizer import EOS_ID, PAD_ID
from model.transformer import BlockMask, block_mask_from_dense, flex_attention_kernel, tracing


def whole_blocks(length: int, block_size: int | None) -> int:
    """length rounded up to whole blocks (unchanged without blocks)."""
    return length if block_size is None else -(-length // block_size) * block_size


def pad_to_blocks(
    input_ids: torch.Tensor, scored: torch.Tensor, block_size: int | None, real=None, with_eos: bool = False
) -> tuple:
    """Right-pad rows to a multiple of block_size (None: no blocks), so the last block is whole: with PAD outside
    every row and never scored (`real`, when given, marks each row's own columns and is padded too), or `with_eos`,
    with scored EOS, LLaDA's SFT padding (how a model learns to stop). Returns (input_ids, scored[, real])."""
    pad = whole_blocks(input_ids.shape[1], block_size) - input_ids.shape[1]
    fills = [(input_ids, EOS_ID if with_eos else PAD_ID), (scored, with_eos)]
    fills += [] if real is None else [(real, False)]
    return tuple(x if pad == 0 else F.pad(x, (0, pad), value=fill) for x, fill in fills)


def bd3lm_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] mask of the BD3LM input [x_t ; x_0], with b = the block of (i mod L):

    noisy -> noisy: same block; noisy -> clean: strictly earlier block; clean -> clean: same or earlier block;
    clean -> noisy: never. Every query sees at least itself.

    One shared tensor per (L, block size, device), never to be edited in place: the transformer builds the
    FlexAttention block mask of each once (model.transformer.block_mask_from_dense).
    """
    if seq_len % block_size:
        raise NanoLladaError(f"block size {block_size} does not divide the sequence length {seq_len}")
    if tracing():  # a traced graph builds it on the device; no Python cache inside it
        return _bd3lm_mask(seq_len, block_size, device)
    return _shared_bd3lm_mask(seq_len, block_size, device)


def _bd3lm_mask(seq_len: int, block_size: int, device) -> torch.Tensor:
    b = (torch.arange(seq_len, device=device) // block_size).repeat(2)  # the block of each position
    clean = torch.arange(2 * seq_len, device=device) >= seq_len
    q_b, k_b = b[:, None], b[None, :]
    q_clean, k_clean = clean[:, None], clean[None, :]
    noisy_noisy = ~q_clean & ~k_clean & (q_b == k_b)
    noisy_clean = ~q_clean & k_clean & (k_b < q_b)
    clean_clean = q_clean & k_clean & (k_b <= q_b)
    return noisy_noisy | noisy_clean | clean_clean


_shared_bd3lm_mask = functools.lru_cache(maxsize=32)(_bd3lm_mask)


def block_causal_mask(block_of: torch.Tensor) -> torch.Tensor:
    """[T, T] inference mask from per-position block indices: query i sees key j iff block(j) <= block(i)."""
    return block_of[None, :] <= block_of[:, None]


def document_ids_with_pad(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """PAD positions become their own document (-1): real tokens never attend to padding, and PAD queries still
    have PAD keys to attend to (no empty row)."""
    return doc_ids.masked_fill(input_ids == PAD_ID, -1)


def document_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: attend only within the same document (LLaDA 2.0 section 3.7 b). The diagonal is always True."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def bd3lm_document_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, 1, 2L, 2L]: the BD3LM rules AND the document rule (both halves carry the same document ids)."""
    L = doc_ids.shape[1]
    return bd3lm_attention_mask(L, block_size, doc_ids.device) & document_attention_mask(doc_ids.repeat(1, 2))


def bdlm_forward(
    model,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    block_size: int,
    doc_ids: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predictions for the L positions of the BD3LM input [x_t ; x_0] (positions 0..L-1 for both halves): each
    block is denoised from itself plus the clean earlier blocks, every block in one forward pass.

    Unshifted: the noisy half's outputs. Shifted (model/logit_shift.py): position j is read at j - 1 as the
    denoiser of j's block sees it: in the noisy half inside a block, in the clean half for a block's first position
    (its left neighbour ends the previous, clean block). With blocks of 1 every prediction comes from the clean half
    under a causal mask: exactly the AR model the weights came from. With `targets` [B, L]: their NLL instead of the
    logits (Transformer.forward).
    """
    B, L = clean.shape
    positions = torch.arange(L, device=clean.device).repeat(2)
    if doc_ids is None:
        attention = bd3lm_attention_mask(L, block_size, clean.device)
    else:
        attention = bd3lm_document_mask(document_ids_with_pad(clean, doc_ids), block_size)
    # Only the outputs read below reach the final norm and head (the rest of the 2L would be computed and dropped).
    return model(
        torch.cat([noisy, clean], dim=1),
        attention=attention,
        positions=positions,
        logits_at=read_at(L, block_size, is_shifted(model), clean.device),
        targets=targets,
    )


def read_at(seq_len: int, block_size: int, shifted: bool, device=None) -> torch.Tensor | slice:
    """Where bdlm_forward reads the prediction of each position 0..L-1 in the 2L outputs: the noisy half in place,
    or, shifted, position j - 1: noisy inside a block, clean (index L + j - 1) at a block's first position. Position
    0 (never predicted) reads clean position 0 as its placeholder, as model.logit_shift.read_shifted does."""
    if not shifted:
        return slice(0, seq_len)
    j = torch.arange(seq_len, device=device)
    return (j - 1).clamp(min=0) + seq_len * (j % block_size == 0)


def flex_probe(model, device: torch.device) -> None:
    """One eager forward and backward of FlexAttention with the model's head shape on a tiny bf16 block-diffusion
    mask: raises what the first training step would, before anything is compiled around it."""
    config, L = model.config, 128  # one FlexAttention tile per half
    shape = (1, config.num_attention_heads, 2 * L, config.head_dim)
    kv_shape = (1, config.num_key_value_heads, 2 * L, config.head_dim)
    q, k, v = (
        torch.randn(s, device=device, dtype=torch.bfloat16, requires_grad=True) for s in (shape, kv_shape, kv_shape)
    )
    block_mask = block_mask_from_dense(bd3lm_attention_mask(L, 32, device), 2 * L, 2 * L)
    grouped = config.num_key_value_heads != config.num_attention_heads
    out = flex_attention_kernel(q, k, v, block_mask, enable_gqa=grouped)
    out.float().square().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous kernel error surfaces here, not in the first step


def choose_flex(model, device: torch.device, probe: Callable = flex_probe, say: Callable[[str], None] = print) -> bool:
    """Whether explicit training masks (document, block diffusion) run FlexAttention: decided once, before compiling,
    by `probe` (model, device), and said in one line; a failed probe leaves them on SDPA for the run. Models that
    train on SDPA anyway (the CPU, unless flex_on_cpu) are left alone. Out-of-memory is an answer, not a failure."""
    if BlockMask is None or not getattr(model, "flex_attention", False):
        return False
    if device.type != "cuda" and not model.flex_on_cpu:
        return False
    try:
        probe(model, device)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:  # the probe's own tensors only: nothing of the run is lost
        model.flex_attention = False
        first_line = (str(err).splitlines() or [""])[0][:120]
        say(f"attention: SDPA for explicit masks (FlexAttention failed its probe: {type(err).__name__}: {first_line})")
        return False
    say("attention: FlexAttention for explicit masks (its forward and backward probe passed)")
    return True
