"""LLaDA masked-diffusion pretraining, from scratch or initialised from an AR model (--init-from-minimind).

uv run python -m scripts.train.diffusion --train --use-tokenizer --tokenizer-dir . \
    --data ./dataset/pretrain_hq.jsonl --seq-len 256 --mask-schedule iid_t \
    --init-from-minimind weights/minimind_pretrain_state_dict.pt --run-name diffusion_from_ar_eq3 --max-iters 40000

LLaDA 2.0 switches (settings of model/diffusion_loss.py, the curriculum in model/block_curriculum.py):
  --mask-schedule wsd --use-block-curriculum  block-size warmup-stable-decay: BDLM on [x_t ; x_0] with block sizes
      rising through --wsd-block-sizes-up, MDLM on the whole row, BDLM with sizes falling to the inference block
      size. --mask-schedule wsd alone keeps the block at the full row in every phase: plain LLaDA Eq. 3 (= iid_t).
  --time-weighted-loss  mask with probability 1 - alpha(t) and weight by -alpha'(t)/(1 - alpha(t)) at that t.
  --use-doc-attention-mask  packed rows attend only within their document (AND the block rules in BDLM).
  --keep-top-k K  keep the K best evaluations' weights for scripts.train.merge_checkpoints.
Validation always scores LLaDA Eq. 3 (MDLM, linear 1/t weight, same masks each eval; with the document mask
when training uses it), so the curve is comparable across curriculum phases and across runs.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace

import torch

from model.block_curriculum import STABLE, BlockCurriculum, default_sizes_down, default_sizes_up
from model.checkpoint import build_model, read_checkpoint, save_checkpoint
from model.conversion import init_mask_embedding
from model.diffusion_loss import DiffusionObjective, diffusion_loss
from model.errors import NanoLladaError
from model.masking import SCHEDULES, random_crop_length
from model.tokenizer import mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import model_config_from_args, positive, run_main
from scripts.common.evaluation import check_compatible
from scripts.common.packing import document_ids
from scripts.common.pretraining import add_pretraining_flags, describe, packed_data
from scripts.common.run_files import RunFiles
from scripts.common.topk import TopKCheckpoints
from scripts.common.trainer import RunOptions, Task, train
from scripts.common.trainer_cli import check_training_flags, start_run


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train (required; to generate use scripts.eval.eval_diffusion)")
    p.add_argument(
        "--use-tokenizer", action="store_true", help="accepted for compatibility: training always uses --tokenizer-dir"
    )
    add_pretraining_flags(
        p, run_name="diffusion", batch_size=64, learning_rate=4e-4, lr_schedule="wsd", warmup_steps=1000
    )
    p.add_argument(
        "--init-from-minimind",
        default=None,
        metavar="PATH",
        help="initialise from an AR checkpoint of this project or an official MiniMind2 .pth",
    )
    p.add_argument(
        "--mask-schedule",
        choices=["iid_t", "wsd"],
        default="iid_t",
        help="iid_t: LLaDA Eq. 3; wsd: LLaDA 2.0 block-size warmup-stable-decay (with --use-block-curriculum)",
    )
    p.add_argument("--iid-mask-eps", type=float, default=1e-3, help="t ~ U(eps, 1 - eps)")
    p.add_argument(
        "--variable-length-prob",
        type=float,
        default=0.01,
        help="probability a training batch is cropped to a random length (LLaDA: 1%%)",
    )
    p.add_argument("--repeat-penalty-weight", type=float, default=0.0, help="weight of the repeat unlikelihood term")
    p.add_argument(
        "--use-block-curriculum",
        action="store_true",
        help="with --mask-schedule wsd: LLaDA 2.0 block-size WSD curriculum",
    )
    p.add_argument(
        "--wsd-block-sizes-up", type=int_list, default=None, help="warmup block sizes (default 1,4,16,64,<seq-len>)"
    )
    p.add_argument(
        "--wsd-block-sizes-down",
        type=int_list,
        default=None,
        help="decay block sizes (default <seq-len>, halving down to --inference-block-size)",
    )
    p.add_argument("--inference-block-size", type=int, default=32, help="where the default decay sizes end")
    p.add_argument(
        "--wsd-phase-ratios", type=float_list, default=[0.3, 0.5, 0.2], help="warmup,stable,decay shares of the steps"
    )
    p.add_argument(
        "--time-weighted-loss",
        action="store_true",
        help="ELBO weight -alpha'(t)/(1-alpha(t)) of --time-weight-schedule",
    )
    p.add_argument(
        "--time-weight-schedule",
        choices=SCHEDULES,
        default="cosine",
        help="alpha(t): cosine = cos^2(pi t/2); linear = 1 - t (weight 1/t, the default loss)",
    )
    p.add_argument(
        "--use-doc-attention-mask", action="store_true", help="packed rows attend only within their own document"
    )
    p.add_argument(
        "--keep-top-k",
        type=int,
        default=0,
        help="keep the K best evaluations' weights (for scripts.train.merge_checkpoints)",
    )
    return p.parse_args(argv)


def check_flags(args) -> None:
    if not args.train:
        raise NanoLladaError(
            "pass --train to train; to generate from a checkpoint use `uv run python -m scripts.eval.eval_diffusion`"
        )
    check_training_flags(args)
    if args.use_block_curriculum and args.mask_schedule != "wsd":
        raise NanoLladaError("--use-block-curriculum is the block-size schedule of --mask-schedule wsd; pass both")
    positive("--inference-block-size", args.inference_block_size)
    positive("--keep-top-k", args.keep_top_k, allow_zero=True)
    if not 0 < args.iid_mask_eps < 0.5:
        raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {args.iid_mask_eps}")
    if not 0 <= args.variable_length_prob <= 1:
        raise NanoLladaError(f"--variable-length-prob must lie in [0, 1], got {args.variable_length_prob}")


def block_curriculum(args, steps: int) -> BlockCurriculum | None:
    if not args.use_block_curriculum:
        return None
    up = args.wsd_block_sizes_up or default_sizes_up(args.seq_len)
    down = args.wsd_block_sizes_down or default_sizes_down(args.seq_len, min(args.inference_block_size, args.seq_len))
    try:
        return BlockCurriculum(args.seq_len, steps, tuple(up), tuple(down), tuple(args.wsd_phase_ratios))
    except NanoLladaError as error:
        raise NanoLladaError(_as_flags(str(error))) from None


def _as_flags(message: str) -> str:
    for field, flag in CURRICULUM_FLAGS.items():
        message = message.replace(field, flag)
    return message


CURRICULUM_FLAGS = {
    "sizes_up": "--wsd-block-sizes-up",
    "sizes_down": "--wsd-block-sizes-down",
    "phase_ratios": "--wsd-phase-ratios",
    "seq_len": "--seq-len",
}


def initial_model(args, tokenizer, files: RunFiles) -> Transformer:
    """Resume the run, or copy an AR model (every tensor, RoPE setting kept), or start fresh from the flags."""
    if args.resume:
        checkpoint = check_compatible(
            read_checkpoint(files.full), files.full, "diffusion", tokenizer, args.tokenizer_dir
        )
        return build_model(checkpoint, files.full)
    if args.init_from_minimind is None:
        return Transformer(model_config_from_args(args, vocab_size=len(tokenizer)))
    source = args.init_from_minimind
    checkpoint = check_compatible(
        read_checkpoint(source),
        source,
        "ar",
        tokenizer,
        args.tokenizer_dir,
        hint="--init-from-minimind takes an AR checkpoint (to continue a diffusion run use --resume)",
    )
    config = checkpoint.config
    requested = model_config_from_args(args, vocab_size=len(tokenizer))
    ignored = [
        name
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "inference_rope_scaling")
        if getattr(requested, name) != getattr(config, name)
    ]
    if ignored:
        print(
            f"note: {', '.join(f'{n}={getattr(requested, n)}' for n in ignored)} ignored: the AR checkpoint has "
            f"{', '.join(f'{n}={getattr(config, n)}' for n in ignored)}, "
            "and the diffusion model keeps its shape and RoPE setting"
        )
    model = build_model(checkpoint, source)
    init_mask_embedding(model, mask_token_id(tokenizer), torch.Generator().manual_seed(args.seed))
    print(
        f"initialised from {source} ({checkpoint.source}): all {len(checkpoint.state_dict)} tensors copied "
        f"(embedding {tuple(model.model.embed_tokens.weight.shape)}, "
        f"head {'tied' if config.tie_word_embeddings else 'untied'}), "
        f"<|mask|> row = mean embedding + noise, attention now bidirectional"
    )
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_flags(args)
    run = start_run(args, "diffusion", packed_data)
    tokenizer, device, batches, val_batches, cfg = run.tokenizer, run.device, run.batches, run.val_batches, run.cfg
    curriculum = block_curriculum(args, cfg.max_steps)  # checked before any model is built
    model = initial_model(args, tokenizer, RunFiles(cfg))
    mask_id = mask_token_id(tokenizer)
    if args.mask_schedule == "wsd" and curriculum is None:
        print(
            "note: --mask-schedule wsd without --use-block-curriculum keeps the block at the whole row in every phase, "
            "i.e. plain masked diffusion (LLaDA Eq. 3, as iid_t)"
        )
    keeper = TopKCheckpoints(args.save_dir, args.run_name, args.keep_top_k, args.resume) if args.keep_top_k else None
    extra = {
        "diffusion": {
            "mask_schedule": args.mask_schedule,
            "iid_mask_eps": args.iid_mask_eps,
            "init_from": args.init_from_minimind,
            "time_weight_schedule": args.time_weight_schedule if args.time_weighted_loss else "linear",
            "doc_attention_mask": args.use_doc_attention_mask,
            "validation": "LLaDA Eq. 3 (MDLM, 1/t)",
            "block_curriculum": None
            if curriculum is None
            else {
                "seq_len": curriculum.seq_len,
                "total_steps": curriculum.total_steps,
                "sizes_up": list(curriculum.sizes_up),
                "sizes_down": list(curriculum.sizes_down),
                "phase_ratios": list(curriculum.phase_ratios),
            },
        }
    }

    loss = PretrainingLoss(args, curriculum, mask_id)
    train_loss, validation_loss = loss.train, loss.validation

    def keep_if_top_k(step, val):  # the trainer calls this on rank 0 after each evaluation
        if keeper is not None and step > 0:
            keeper.offer(
                step,
                val,
                lambda path: save_checkpoint(
                    path,
                    "diffusion",
                    model.config,
                    model,
                    tokenizer_identity(tokenizer),
                    step=step,
                    val_loss=val,
                    train_config=asdict(cfg),
                    **extra,
                ),
            )

    print(describe(f"diffusion ({loss.describe()})", model, batches, val_batches, cfg.max_steps, device))
    task = Task(batches.batch, val_batches, train_loss, validation_loss)
    options = RunOptions(tokenizer_identity(tokenizer), args.resume, extra, on_eval=keep_if_top_k)
    summary = train(model, cfg, task, options, device)
    if keeper is not None:
        print(
            f"kept the {len(keeper.entries)} best evaluations in {keeper.index}; merge them with "
            f"`uv run python -m scripts.train.merge_checkpoints --run-name {args.run_name} "
            f"--save-dir {args.save_dir} --k {args.keep_top_k}`"
        )
    return summary


class PretrainingLoss:
    """The training and validation objectives of a run: one diffusion_loss, with the block size of the curriculum's
    step. Validation always scores LLaDA Eq. 3 (whole row, linear 1/t weight; with the document mask when training
    uses it), so the curve is comparable across curriculum phases and across runs."""

    def __init__(self, args, curriculum: BlockCurriculum | None, mask_id: int):
        self.args, self.curriculum, self.mask_id = args, curriculum, mask_id
        eps = args.iid_mask_eps
        schedule = args.time_weight_schedule if args.time_weighted_loss else "linear"
        self.objective = DiffusionObjective(schedule, eps, 1 - eps, repeat_penalty_weight=args.repeat_penalty_weight)
        self.validation_objective = DiffusionObjective("linear", eps, 1 - eps)

    def documents(self, rows):
        return document_ids(rows) if self.args.use_doc_attention_mask else None

    def train(self, model, rows, rng, step):
        phase, block_size = self.curriculum.at(step) if self.curriculum else (STABLE, 0)
        block_size = None if phase == STABLE else block_size  # the whole row: the cheaper L-token forward
        # The crop decision comes from its own CPU stream, seeded like the masks: no GPU sync for a shape.
        crop_rng = torch.Generator().manual_seed(rng.initial_seed() ^ 0x5EED)
        length = random_crop_length(rows.shape[1], self.args.variable_length_prob, crop_rng, block_size or 1)
        rows = rows[:, :length]
        objective = replace(self.objective, block_size=block_size)
        loss = diffusion_loss(model, rows, rng, self.mask_id, objective, doc_ids=self.documents(rows))
        return (loss, {"phase": phase, "block": block_size or rows.shape[1]}) if self.curriculum else loss

    def validation(self, model, rows, rng):
        return diffusion_loss(model, rows, rng, self.mask_id, self.validation_objective, doc_ids=self.documents(rows))

    def describe(self) -> str:
        if self.curriculum is None and self.objective.schedule == "linear" and not self.args.use_doc_attention_mask:
            return "LLaDA Eq. 3"
        blocks = "WSD block curriculum " + describe_curriculum(self.curriculum) if self.curriculum else "MDLM"
        documents = ", document mask" if self.args.use_doc_attention_mask else ""
        return f"LLaDA 2.0: {blocks}, {self.objective.schedule} time weight{documents}"


def describe_curriculum(curriculum: BlockCurriculum) -> str:
    stable_start, decay_start = curriculum.boundaries()
    return (
        f"(warmup steps 0-{stable_start - 1} blocks {list(curriculum.sizes_up)}, "
        f"stable to {decay_start - 1} block {curriculum.seq_len}, "
        f"decay blocks {list(curriculum.sizes_down)})"
    )


if __name__ == "__main__":
    run_main(main)
