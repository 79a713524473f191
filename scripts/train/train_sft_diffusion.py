"""Diffusion SFT (LLaDA): the prompt is never masked; answer tokens and their EOS padding are masked with
t ~ U(eps, 1-eps) and the loss is normalised by each sample's answer length, its EOS padding weighted
--eos-padding-weight (model/objectives/diffusion_loss.py). The padding runs to the batch's longest row, or is
--eos-padding-length tokens per answer.

Multi-turn rows: every assistant turn is a target at once (user/system turns are the clean prompt), so the
model learns p(all answers | all user turns); the last turn of a chat at inference is the single-turn case.

uv run python -m scripts.train.train_sft_diffusion --data dataset/sft_mini_512.jsonl --tokenizer-dir . \
    --load-from weights/diffusion_from_ar_eq3_best.pt --run-name diffusion_sft --max-seq-len 512 --batch-size 96 \
    --epochs 3
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from model.checkpoint import joint_record
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.objectives.diffusion_loss import MASK_DRAWS, NORMALIZATIONS, DiffusionObjective, diffusion_loss
from model.objectives.schedule import SCHEDULES, NoiseSchedule
from model.tokenizer import mask_token_id
from scripts.common.cli import parse, run_main
from scripts.common.settings import add_flags, flag, flag_fields, settings_from
from scripts.common.training.flags import TrainingFlags
from scripts.common.training.sft import SFTData, run_sft, sft_parser, sft_starting_checkpoint, start_sft

# The answer's other terms against the first token's exact term, by default (the SFT protocol, technical_report 7.9).
EXACT_TERM_DENOISING_WEIGHT = 0.1


@dataclass
class DiffusionSFTData(SFTData):
    """The SFT data flags, and the settings that decide what a diffusion SFT run trains (a resumed run must keep
    them): the block size, the fixed EOS padding and the joint AR loss weight."""

    block_size: int | None = flag(
        None,
        "block-diffusion SFT with this block size (BD3LM mask; LLaDA 2.0); default: the block size the --load-from "
        "model was trained with (none for a bidirectional model); 0: bidirectional SFT whatever the model was",
        low=0,
        kind=int,
    )
    eos_padding_length: int | None = flag(
        None,
        "EOS padding after each answer: exactly this many tokens, the columns after them out of attention, so the "
        "model learns the canvas it decodes (answer + padding ~ --max-new-tokens); default: to the batch's longest "
        "row (LLaDA), see technical_report.md 7.7; at most --max-seq-len",
        kind=int,
    )
    ar_loss_weight: float = flag(
        0.0, "joint training: + this weight x the causal next-token loss of the answers (a shifted model only)", low=0
    )
    prompt_causal: bool | None = flag(
        None,
        "read the prompt causally (each prompt token sees only those before it; the answer sees everything), as the "
        "model then decodes; a logit-shifted model's first answer token is then scored exactly on every row "
        "(model/prompt_causal.py); default: on, except for block-diffusion SFT (a resumed run keeps its own)",
        kind=bool,
    )


@dataclass
class SFTObjectiveFlags:
    """How the answer is masked and weighted (model/objectives/diffusion_loss.py, DiffusionObjective)."""

    iid_mask_eps: float = flag(1e-3, "t ~ U(eps, 1 - eps)")
    loss_normalization: str = flag(
        "row",
        "row: each sample's loss divided by its answer length (LLaDA); batch: one token mean over the batch",
        choices=NORMALIZATIONS,
    )
    eos_padding_weight: float = flag(
        0.1,
        "weight of the EOS padding after each answer in the loss and its length (1: LLaDA's normalisation; 0.1 gives "
        "the tokens of a short answer a real share of its loss, see technical_report.md 7.3)",
        low=0,
        high=1,
    )
    mask_draw: str = flag(
        "time",
        "time: t ~ U(eps, 1 - eps), each answer token masked with probability t, weight 1/t; count: exactly l ~ "
        "U{1..n} of the n answer tokens masked, weight n/l (LLaDA Algorithm 3: same expected loss, less variance)",
        choices=MASK_DRAWS,
    )
    late_time_share: float = flag(
        0.0,
        "this share of rows draws t ~ U(--late-time-from, 1 - eps), every row importance-weighted: the same NELBO, t "
        "near 1 (the all-masked canvas decoding starts from) more often",
    )
    late_time_from: float = flag(0.9, "where the late band starts")
    all_masked_share: float = flag(
        0.0,
        "this share of rows trained at t = 1, every answer position masked, weight 1 (the first decoding step's "
        "loss); the rest draws t as above: a mixture with the NELBO's minimiser, not an ELBO unless 0",
    )
    mask_ratio_min: float | None = flag(None, "LLaDA 2.0 mask-ratio bandwidth: t ~ U(min, max)", kind=float)
    mask_ratio_max: float | None = flag(None, "the bandwidth's upper end", kind=float)
    complementary_masking: bool = flag(False, "LLaDA 2.0: each sample twice, a mask and its complement")
    cap_weight: float = flag(0.0, "LLaDA 2.0: weight of the confidence-aware (CAP) auxiliary loss")
    time_weight_schedule: str = flag("linear", "alpha(t) of the mask ratio and its weight", choices=SCHEDULES)
    denoising_weight: float | None = flag(
        None,
        "the weight of every answer term but the first token's exact one, which a prompt-causal shifted model has (1: "
        "the NELBO; lower gives the decision the first token carries more of the gradient, not an ELBO); default: "
        f"{EXACT_TERM_DENOISING_WEIGHT} with that term, else 1 (technical_report.md 7.9)",
        low=0,
        above_low=True,
        high=1,
        kind=float,
    )

    def time_range(self) -> tuple[float, float]:
        """(t_min, t_max): the LLaDA 2.0 band where given, else U(eps, 1 - eps); refused unless 0 < min < max < 1."""
        t_min = self.iid_mask_eps if self.mask_ratio_min is None else self.mask_ratio_min
        t_max = 1 - self.iid_mask_eps if self.mask_ratio_max is None else self.mask_ratio_max
        if not 0 < t_min < t_max < 1:
            raise NanoLladaError(f"mask-ratio band must satisfy 0 < min < max < 1, got {t_min}, {t_max}")
        return t_min, t_max

    def objective(self, block_size: int | None, ar_loss_weight: float, exact_first_term: bool) -> DiffusionObjective:
        """The DiffusionObjective of these flags; `exact_first_term`: the model is prompt-causal and shifted."""
        t_min, t_max = self.time_range()
        default_weight = EXACT_TERM_DENOISING_WEIGHT if exact_first_term else 1.0
        return DiffusionObjective(
            schedule=NoiseSchedule(self.time_weight_schedule),
            t_min=t_min,
            t_max=t_max,
            block_size=block_size,
            normalization=self.loss_normalization,
            padding_weight=self.eos_padding_weight,
            complementary=self.complementary_masking,
            cap_weight=self.cap_weight,
            mask_draw=self.mask_draw,
            late_time_share=self.late_time_share,
            late_time_from=self.late_time_from,
            all_masked_share=self.all_masked_share,
            ar_loss_weight=ar_loss_weight,
            denoising_weight=default_weight if self.denoising_weight is None else self.denoising_weight,
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = sft_parser(__doc__, run_name="diffusion_sft", epochs=3)
    add_flags(p, DiffusionSFTData, skip=tuple(f.name for f in flag_fields(SFTData)))
    add_flags(p, SFTObjectiveFlags)
    return parse(p, argv)


def check_eos_padding(padding: int | None, seq_len: int, positions: int | None = None) -> None:
    """--eos-padding-length pads each answer, so a row is up to --max-seq-len plus it: at most --max-seq-len (the
    padding stands for a generation no longer than a row), and with a model, row and padding within its positions.
    Checked before the data is read and again with the model's `positions`, not at the first batch's allocation."""
    if padding is None:
        return
    if not 0 <= padding <= seq_len:
        raise NanoLladaError(
            f"--eos-padding-length must be >= 0 and <= --max-seq-len {seq_len} (it stands for a generation, "
            f"which a row bounds), got {padding}"
        )
    if positions is not None and seq_len + padding > positions:
        raise NanoLladaError(
            f"--max-seq-len {seq_len} plus --eos-padding-length {padding} exceeds the model's {positions} "
            "positions; lower one of them"
        )


def sft_block_size(asked: int | None, resume: bool, source, checkpoint) -> int | None:
    """The block size of the SFT: --block-size (0: none), else the one the starting checkpoint has (a
    block-diffusion model stays one; a resumed run keeps its own), else none (a bidirectional or fresh model)."""
    if asked is not None:
        return asked or None
    inherited = trained_block_size(checkpoint.extra) if checkpoint is not None else None
    if inherited and not resume:
        print(
            f"note: {source} was trained with block diffusion (blocks of {inherited}): block SFT with it "
            "(--block-size 0 for bidirectional SFT)"
        )
    return inherited


def prompt_reading(asked: bool | None, block_size: int | None, resume: bool, checkpoint) -> bool:
    """Whether the SFT reads the prompt causally: --prompt-causal / --no-prompt-causal, else what a resumed run
    started with, else on unless the SFT is block diffusion (its blocks already read earlier blocks causally)."""
    if asked is not None:
        return asked
    if resume and checkpoint is not None:
        return checkpoint.config.prompt_causal
    return not block_size


def main(argv=None) -> dict:
    args = parse_args(argv)
    own = settings_from(DiffusionSFTData, args)
    flags = TrainingFlags.from_args(args, "diffusion", own)
    objective_flags = settings_from(SFTObjectiveFlags, args)
    objective_flags.time_range()  # checked before any data is read
    check_eos_padding(own.eos_padding_length, flags.run.seq_len)
    run = start_sft(flags, eos_padding=own.eos_padding_length)
    start = sft_starting_checkpoint(flags, run)
    # a fresh model takes the shape flags
    positions = start[1].config.max_position_embeddings if start[1] is not None else args.max_position_embeddings
    check_eos_padding(own.eos_padding_length, flags.run.seq_len, positions)
    block_size = sft_block_size(own.block_size, flags.run.resume, *start)
    prompt_causal = prompt_reading(own.prompt_causal, block_size, flags.run.resume, start[1])
    shifted = start[1] is not None and start[1].config.logit_shift
    objective = objective_flags.objective(block_size, own.ar_loss_weight, prompt_causal and shifted)
    mask_id = mask_token_id(run.tokenizer)

    def loss(model, batch, rng, step=None):  # the prompt is clean: only the answer and its EOS padding are maskable
        stats = {}
        loss = diffusion_loss(
            model,
            batch["input_ids"],
            rng,
            mask_id,
            objective,
            batch["maskable"],
            scored_at=batch.get("scored_at"),
            real=batch.get("real"),
            stats=stats,
        )
        return loss, stats

    # A block-trained model decodes block-causally with an exact cache (scripts.eval.eval_diffusion reads this).
    meta = {"sft_objective": asdict(objective), "sft_eos_padding_length": own.eos_padding_length}
    if block_size:
        meta["block_diffusion"] = {"block_size": block_size}
    meta.update(joint_record(own.ar_loss_weight))  # also an AR model (model.checkpoint.decodes_causally)
    # how the model reads a prompt is part of its config: the sampler and the likelihoods follow it
    return run_sft(flags, run, loss, extra_meta=meta, start=start, config_changes={"prompt_causal": prompt_causal})


if __name__ == "__main__":
    run_main(main)
