"""Per-token cross-entropy in fp32, computed where it costs least.

The losses call it inside the model's forward (Transformer.forward(..., targets=...)), so a compiled model traces
the plain `F.cross_entropy(logits.float(), ...)` into its graph: inductor fuses the upcast, the vocabulary slice
and the softmax-minus-one-hot of the backward, and no [N, V] fp32 tensor is ever written (about 1.3 GB of traffic
per 128 x 256 step against about 14 GB chunked). Eagerly on CUDA (--no-compile) the chunked version runs instead:
plain eager `F.cross_entropy` on bf16 logits keeps an fp32 copy and an fp32 log-softmax for the backward and makes
an fp32 gradient (three [N, V] fp32 tensors), where the chunked one saves the logits as they came and one
log-sum-exp per row and rebuilds the softmax chunk by chunk in the backward. On the CPU the plain computation
runs, so CPU losses stay bit-identical to the ones measured before either existed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 4096  # fp32 working set of 4096 x 6401 x 4 B = 105 MB

IGNORE_INDEX = -100  # cross-entropy target of positions that are not scored (PyTorch's default ignore_index)


def logits_or_nll(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """What a model's forward returns: the logits [B, T, V], or, given targets [B, T] (IGNORE_INDEX where unscored),
    their fp32 cross-entropy [B, T] (0 where ignored), computed in the forward so a compiled model fuses it."""
    if targets is None:
        return logits
    return fp32_cross_entropy(logits.flatten(0, -2), targets.flatten(), IGNORE_INDEX).view(targets.shape)


def fp32_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str = "none"
) -> torch.Tensor:
    """fp32 cross-entropy of logits [N, V] against targets [N]: per row ("none"; 0 and no gradient at ignore_index)
    or the mean over the rows not ignored ("mean"), as F.cross_entropy. Plain on the CPU and inside a compiled graph
    (which fuses it), chunked on eager CUDA."""
    if not logits.is_cuda or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)
    nll = chunked_cross_entropy(logits, targets, ignore_index)
    return nll if reduction == "none" else nll.sum() / (targets != ignore_index).sum()


def chunked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """fp32_cross_entropy computed chunk_rows rows at a time (any device; the CUDA path of fp32_cross_entropy)."""
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, chunk_rows: int):
        kept = targets != ignore_index
        safe_targets = targets.masked_fill(~kept, 0)
        log_norm = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        nll = torch.empty_like(log_norm)
        for start in range(0, logits.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = logits[rows].float()
            log_norm[rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, safe_targets[rows, None]).squeeze(-1)
            nll[rows] = torch.where(kept[rows], log_norm[rows] - picked, 0.0)
        ctx.save_for_backward(logits, safe_targets, kept, log_norm)
        ctx.chunk_rows = chunk_rows
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        logits, safe_targets, kept, log_norm = ctx.saved_tensors
        grad = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
        scale = torch.where(kept, grad_nll.float(), 0.0)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            # d nll / d logits = softmax - one_hot(target), per row
            chunk = (logits[rows].float() - log_norm[rows, None]).exp_()
            chunk.scatter_add_(-1, safe_targets[rows, None], torch.full_like(chunk[:, :1], -1.0))
            grad[rows] = chunk.mul_(scale[rows, None])
        return grad, None, None, None
