"""Attention masks of block diffusion and packed documents, and the forward pass over [x_t ; x_0].

Masks are boolean, True = may attend, broadcastable to [B, heads, T, S] (what Transformer takes). On CUDA
training the transformer serves them through FlexAttention; elsewhere through SDPA.
Blocks start at position 0 of the row (a prompt included), in training and at inference alike.
"""

from __future__ import annotations

import torch

from model.errors import NanoLladaError
from model.logit_shift import is_shifted, read_shifted
from model.tokenizer import PAD_ID


def block_ids(length: int, block_size: int, device=None) -> torch.Tensor:
    """Block index of each position 0..length-1."""
    return torch.arange(length, device=device) // block_size


def bd3lm_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """[2L, 2L] mask of the BD3LM input [x_t ; x_0], with b = the block of (i mod L):

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
    model, noisy: torch.Tensor, clean: torch.Tensor, block_size: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Predictions for the L positions of the BD3LM input [x_t ; x_0] (positions 0..L-1 for both halves): each
    block is denoised from itself plus the clean earlier blocks, every block in one forward pass.

    Unshifted: the noisy half's outputs. Shifted (model/logit_shift.py): position j is read at j - 1 as the denoiser
    of j's block sees it: in the noisy half inside a block, in the clean half for a block's first position (its left
    neighbour ends the previous, clean block). With blocks of 1 every prediction comes from the clean half under a
    causal mask: exactly the AR model the weights came from.
    """
    B, L = clean.shape
    positions = torch.arange(L, device=clean.device).repeat(2)
    if doc_ids is None:
        attention = bd3lm_attention_mask(L, block_size, clean.device)
    else:
        attention = bd3lm_document_mask(document_ids_with_pad(clean, doc_ids), block_size)
    logits = model(torch.cat([noisy, clean], dim=1), attention=attention, positions=positions)
    if not is_shifted(model):
        return logits[:, :L]
    starts_block = (torch.arange(L, device=clean.device) % block_size == 0)[None, :, None]
    return torch.where(starts_block, read_shifted(logits[:, L:]), read_shifted(logits[:, :L]))
