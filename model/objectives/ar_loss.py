"""The AR objective: the next-token cross-entropy of the causal transformer (MiniMind's pretraining and SFT loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
