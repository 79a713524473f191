"""The AR objective: the next-token cross-entropy of the causal transformer (MiniMind's pretraining and SFT loss),
and its weighted form, the AR term of joint AR + diffusion training (model/objectives/diffusion_loss.py); and the
label's share of an SFT step's gradient, which both routes log: for a one-decision answer (the sentiment questions)
the first answer token is the whole decision, and an objective that spends its gradient elsewhere learns it slowly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.block_attention import document_attention_mask, document_ids_with_pad
from model.cross_entropy import IGNORE_INDEX


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
    stats: a dict that receives "label_share", the first answer token's share of the gradient (label_gradient_share).
    """
    targets = F.pad((input_ids if labels is None else labels)[:, 1:], (0, 1), value=IGNORE_INDEX)
    if scored_at is not None:
        targets = targets.gather(1, scored_at)
    nll = model(input_ids, attention="causal", logits_at=scored_at, targets=targets)  # the loss inside the forward
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


@torch.no_grad()
def label_gradient_share(nll: torch.Tensor, weight: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """The share of the loss's gradient w.r.t. the logits that falls on each row's first supervised position, a
    0-dim tensor in [0, 1] (kept on the device: the trainer reads it at its log interval, not every step).

    nll, weight, supervised [B, L]: each position's cross-entropy, its factor in the loss (0 where not scored this
    step), and the positions the objective supervises at all. A position's gradient dCE/dlogits = softmax - onehot has
    an L2 norm between 1 - p and sqrt(2) (1 - p), p = exp(-nll) the target's probability, so weight * (1 - p) measures
    it to within sqrt(2).
    """
    first = supervised & (supervised.long().cumsum(1) == 1)
    size = weight.float() * -torch.expm1(-nll.float())
    return (size * first).sum() / size.sum().clamp(min=1e-12)
