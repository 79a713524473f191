"""The objectives of a diffusion pretraining run (scripts.train.diffusion): the training loss of each step (its
block size from the curriculum or --block-size, its crop) and the fixed validation loss."""

from __future__ import annotations

from dataclasses import replace

import torch

from model.objectives.block_curriculum import STABLE, BlockCurriculum
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.masking import random_crop_length
from scripts.common.data.packing import document_ids
from scripts.common.training.trainer import seeded_generator


class PretrainingLoss:
    """The training and validation objectives of a run: one diffusion_loss, with the block size of the step (the
    curriculum's, or a fixed --block-size). Validation always scores LLaDA Eq. 3 (linear 1/t weight, ordinary
    masking; with the document mask when training uses it) over the whole row, or over blocks of a fixed
    --block-size, so the curve is comparable across curriculum phases and across runs of the same structure."""

    def __init__(self, args, curriculum: BlockCurriculum | None, mask_id: int):
        self.args, self.curriculum, self.mask_id = args, curriculum, mask_id
        eps = args.iid_mask_eps
        schedule = args.time_weight_schedule if args.time_weighted_loss else "linear"
        self.objective = DiffusionObjective(
            schedule,
            eps,
            1 - eps,
            repeat_penalty_weight=args.repeat_penalty_weight,
            position_masking=args.position_masking,
            ar_loss_weight=args.ar_loss_weight,
        )
        self.validation_objective = DiffusionObjective("linear", eps, 1 - eps, block_size=args.block_size)

    def documents(self, rows):
        return document_ids(rows) if self.args.use_doc_attention_mask else None

    def block_at(self, step: int) -> tuple[str | None, int | None]:
        """(curriculum phase or None, block size or None for the whole row) at this step."""
        if self.curriculum is None:
            return None, self.args.block_size
        phase, block_size = self.curriculum.at(step)
        return phase, None if phase == STABLE else block_size  # the whole row: the cheaper L-token forward

    def train(self, model, rows, rng, step):
        phase, block_size = self.block_at(step)
        rows = rows[:, : self.crop_length(rows.shape[1], step, block_size)]
        objective = replace(self.objective, block_size=block_size)
        loss = diffusion_loss(model, rows, rng, self.mask_id, objective, doc_ids=self.documents(rows))
        return (loss, {"phase": phase, "block": block_size or rows.shape[1]}) if self.curriculum else loss

    def crop_length(self, seq_len: int, step: int, block_size: int | None) -> int:
        """The step's row length, a function of (seed, step) alone: every rank and every micro-step of a step crops
        alike (ranks compile the same shapes at the same steps), and a resumed run crops as the first did."""
        crop_rng = seeded_generator(torch.device("cpu"), self.args.seed, step, 0x5EED)
        return random_crop_length(seq_len, self.args.variable_length_prob, crop_rng, block_size or 1)

    def validation(self, model, rows, rng):
        return diffusion_loss(model, rows, rng, self.mask_id, self.validation_objective, doc_ids=self.documents(rows))

    def describe(self) -> str:
        joint = f" + {self.args.ar_loss_weight:g} x causal next-token loss" if self.args.ar_loss_weight else ""
        return self.describe_diffusion() + joint

    def describe_diffusion(self) -> str:
        a = self.args
        plain = not (self.curriculum or a.block_size or a.position_masking or a.use_doc_attention_mask)
        if plain and self.objective.schedule == "linear":
            return "LLaDA Eq. 3"
        if self.curriculum:
            blocks = "WSD block curriculum " + describe_curriculum(self.curriculum)
        else:
            blocks = f"BDLM, blocks of {a.block_size}" if a.block_size else "MDLM"
        blocks += f", position-dependent masking {a.position_masking:g}" if a.position_masking else ""
        documents = ", document mask" if self.args.use_doc_attention_mask else ""
        return f"LLaDA 2.0: {blocks}, {self.objective.schedule} time weight{documents}"


def describe_curriculum(curriculum: BlockCurriculum) -> str:
    stable_start, decay_start = curriculum.boundaries()
    return (
        f"(warmup steps 0-{stable_start - 1} blocks {list(curriculum.sizes_up)}, "
        f"stable to {decay_start - 1} block {curriculum.seq_len}, "
        f"decay blocks {list(curriculum.sizes_down)})"
    )
