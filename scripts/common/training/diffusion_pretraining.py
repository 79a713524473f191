"""The objectives of a diffusion pretraining run (scripts.train.diffusion): the training loss of each step (its
block size from the curriculum or --block-size, its crop) and the fixed validation loss."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from model.objectives.block_curriculum import STABLE, BlockCurriculum
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.masking import random_crop_length
from model.objectives.schedule import LINEAR, SCHEDULES, NoiseSchedule
from scripts.common.data.packing import document_ids
from scripts.common.settings import comma_list, flag
from scripts.common.training.pretraining import Corpus
from scripts.common.training.trainer import seeded_generator


@dataclass
class DiffusionSettings:
    """The flags of diffusion pretraining besides the training flags: what the model starts from and how it reads its
    outputs (AR-to-diffusion conversion), the objective (LLaDA Eq. 3 and its variants), LLaDA 2.0's block-size
    curriculum, and the top-k checkpoints kept for merging."""

    init_from_minimind: str | None = flag(
        None, "initialise from an AR checkpoint of this project or an official MiniMind2 .pth", kind=str, metavar="PATH"
    )
    logit_shift: bool | None = flag(
        None,
        "predict each position from the one before it, keeping the AR head's meaning (default: on with "
        "--init-from-minimind, off from scratch; a resumed run keeps its own)",
        kind=bool,
    )
    block_size: int | None = flag(
        None,
        "block diffusion at every step (BD3LM: causal across blocks, bidirectional within); the model then decodes "
        "block-causally with this block size. 0 (the default): the whole row",
        low=0,
        kind=int,
    )
    position_masking: float = flag(
        0.0, "mask later positions of a block more often (Efficient-DLM), this strongly", low=0
    )
    mask_schedule: str = flag(
        "iid_t",
        "iid_t: LLaDA Eq. 3; wsd: LLaDA 2.0 block-size warmup-stable-decay (with --use-block-curriculum)",
        choices=["iid_t", "wsd"],
    )
    iid_mask_eps: float = flag(1e-3, "t ~ U(eps, 1 - eps)")
    variable_length_prob: float = flag(0.01, "probability a batch is cropped to a random length (LLaDA: 1%%)")
    repeat_penalty_weight: float = flag(0.0, "weight of the repeat unlikelihood term")
    ar_loss_weight: float = flag(
        0.0,
        "joint training: + this weight x the causal next-token loss of the same weights (a shifted model only)",
        low=0,
    )
    time_weighted_loss: bool = flag(False, "ELBO weight -alpha'(t)/(1-alpha(t)) of --time-weight-schedule")
    time_weight_schedule: str = flag(
        "cosine", "alpha(t): cosine = cos^2(pi t/2); linear = 1 - t (weight 1/t, the default loss)", choices=SCHEDULES
    )
    use_doc_attention_mask: bool = flag(False, "packed rows attend only within their own document")
    use_block_curriculum: bool = flag(False, "with --mask-schedule wsd: LLaDA 2.0 block-size WSD curriculum")
    wsd_block_sizes_up: list[int] | None = flag(
        None, "warmup block sizes (default 1,4,16,64,<seq-len>)", kind=comma_list(int)
    )
    wsd_block_sizes_down: list[int] | None = flag(
        None, "decay block sizes (default <seq-len>, halving down to --inference-block-size)", kind=comma_list(int)
    )
    inference_block_size: int = flag(32, "where the default decay sizes end", low=1)
    wsd_phase_ratios: list[float] = flag([0.3, 0.5, 0.2], "warmup,stable,decay shares of the steps")
    keep_top_k: int = flag(0, "keep the K best evaluations' weights (for scripts.train.merge_checkpoints)", low=0)
    corpus: Corpus = None


class PretrainingLoss:
    """The training and validation objectives of a run: one diffusion_loss, with the block size of the step (the
    curriculum's, or a fixed --block-size). Validation scores LLaDA Eq. 3 (in blocks of a fixed --block-size), as
    scripts/train/diffusion.py says."""

    def __init__(self, settings: DiffusionSettings, seed: int, curriculum: BlockCurriculum | None, mask_id: int):
        self.settings, self.seed, self.curriculum, self.mask_id = settings, seed, curriculum, mask_id
        eps = settings.iid_mask_eps
        schedule = settings.time_weight_schedule if settings.time_weighted_loss else "linear"
        self.objective = DiffusionObjective(
            NoiseSchedule(schedule),
            eps,
            1 - eps,
            repeat_penalty_weight=settings.repeat_penalty_weight,
            position_masking=settings.position_masking,
            ar_loss_weight=settings.ar_loss_weight,
        )
        self.validation_objective = DiffusionObjective(LINEAR, eps, 1 - eps, block_size=settings.block_size)

    def documents(self, rows):
        return document_ids(rows) if self.settings.use_doc_attention_mask else None

    def block_at(self, step: int) -> tuple[str | None, int | None]:
        """(curriculum phase or None, block size or None for the whole row) at this step."""
        if self.curriculum is None:
            return None, self.settings.block_size
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
        crop_rng = seeded_generator(torch.device("cpu"), self.seed, step, 0x5EED)
        return random_crop_length(seq_len, self.settings.variable_length_prob, crop_rng, block_size or 1)

    def validation(self, model, rows, rng):
        return diffusion_loss(model, rows, rng, self.mask_id, self.validation_objective, doc_ids=self.documents(rows))

    def describe(self) -> str:
        a = self.settings
        joint = f" + {a.ar_loss_weight:g} x causal next-token loss" if a.ar_loss_weight else ""
        plain = not (self.curriculum or a.block_size or a.position_masking or a.use_doc_attention_mask)
        if plain and self.objective.schedule == LINEAR:
            return "LLaDA Eq. 3" + joint
        if self.curriculum:
            blocks = "WSD block curriculum " + describe_curriculum(self.curriculum)
        else:
            blocks = f"BDLM, blocks of {a.block_size}" if a.block_size else "MDLM"
        blocks += f", position-dependent masking {a.position_masking:g}" if a.position_masking else ""
        documents = ", document mask" if a.use_doc_attention_mask else ""
        return f"LLaDA 2.0: {blocks}, {self.objective.schedule.name} time weight{documents}{joint}"


def describe_curriculum(curriculum: BlockCurriculum) -> str:
    stable_start, decay_start = curriculum.boundaries()
    return (
        f"(warmup steps 0-{stable_start - 1} blocks {list(curriculum.sizes_up)}, "
        f"stable to {decay_start - 1} block {curriculum.seq_len}, "
        f"decay blocks {list(curriculum.sizes_down)})"
    )
