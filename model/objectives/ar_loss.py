"""The AR objective: the next-token cross-entropy of the causal transformer (MiniMind's pretraining and SFT loss),
and its weighted form, the AR term of joint AR + diffusion training (model/objectives/diffusion_loss.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.block_attention import document_attention_mask, document_ids_with_pad
from model.cross_entropy import IGNORE_INDEX
from model.objectives.gradient_share import label_gradient_share


def next_token_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    scored_at: torch.Tensor | None = None,
    stats: dict | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from tokens <= t (labels == IGNORE_INDEX are not scored).

    scored_at [B, K]: positions t that include every scored one (the SFT batcher lists each row's answer positions,
    padded with unscored ones). The final norm and the head then run only there: on SFT batches most positions are
    prompt, and at this size the head is half the model's cost.
    stats: a dict that receives "label_share", the first answer token's share of the gradient (gradient_share.py).
    """
    targets = F.pad((input_ids if labels is None else labels)[:, 1:], (0, 1), value=IGNORE_INDEX)
    if scored_at is None:
        nll = model(input_ids, attention="causal", targets=targets)  # the loss inside the (compiled) forward
    else:
        targets = targets.gather(1, scored_at)
        nll = model(input_ids, attention="causal", logits_at=scored_at, targets=targets)
    scored = targets != IGNORE_INDEX
    if stats is not None:
        stats["label_share"] = label_gradient_share(nll, scored, scored)
    return nll.sum() / scored.sum()


def causal_token_nll(model, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """NLL [B, L] of each token given the tokens before it under causal attention (within its own document when
    doc_ids is given), read one position to the left; position 0, which nothing predicts, scores 0."""
    attention = "causal"
    if doc_ids is not None:
        L = input_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        attention = document_attention_mask(document_ids_with_pad(input_ids, doc_ids)) & causal
    nll = model(input_ids, attention=attention, targets=F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX))
    return F.pad(nll[:, :-1], (1, 0))


def weighted_next_token_loss(
    model, input_ids: torch.Tensor, weights: torch.Tensor, per_row: bool, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_j c_j * NLL(x_j | x_<j) / sum_j c_j with token weights c_j = weights [B, L] (0: not scored), over the
    batch, or per row then averaged (per_row): the diffusion loss's normalisation with every weighted token scored
    by the causal model instead of under a mask. Position 0 must carry weight 0."""
    scored = causal_token_nll(model, input_ids, doc_ids) * weights
    if per_row:
        return (scored.sum(1) / weights.sum(1).clamp(min=1e-6)).mean()
    return scored.sum() / weights.sum().clamp(min=1e-6)
