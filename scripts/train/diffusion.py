"""LLaDA masked-diffusion pretraining, from scratch or initialised from an AR model (--init-from-minimind).

uv run python -m scripts.train.diffusion --train --use-tokenizer --tokenizer-dir . \
    --data ./dataset/pretrain_hq.jsonl --seq-len 256 --mask-schedule iid_t \
    --init-from-minimind weights/minimind_pretrain_state_dict.pt --run-name diffusion_from_ar_eq3 --max-iters 40000

LLaDA 2.0 switches (settings of model/objectives/diffusion_loss.py, the curriculum in
model/objectives/block_curriculum.py):
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
from dataclasses import asdict

import torch

from model.checkpoint import build_model, check_compatible, read_checkpoint, save_checkpoint
from model.errors import NanoLladaError
from model.objectives.block_curriculum import BlockCurriculum, default_sizes_down, default_sizes_up
from model.objectives.conversion import init_mask_embedding
from model.objectives.masking import SCHEDULES
from model.tokenizer import mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import flag_names, model_config_from_args, parse, positive, run_main
from scripts.common.training.diffusion_pretraining import PretrainingLoss
from scripts.common.training.flags import check_training_flags, start_run, starting_checkpoint
from scripts.common.training.pretraining import add_pretraining_flags, describe, packed_data
from scripts.common.training.run_files import RunFiles
from scripts.common.training.topk import TopKCheckpoints
from scripts.common.training.trainer import RunOptions, Task, train


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
    _add_conversion_flags(p)
    _add_objective_flags(p)
    _add_curriculum_flags(p)
    return parse(p, argv)


def _add_conversion_flags(p: argparse.ArgumentParser) -> None:
    """What the model starts from and how it reads its outputs (AR-to-diffusion conversion)."""
    p.add_argument(
        "--init-from-minimind",
        default=None,
        metavar="PATH",
        help="initialise from an AR checkpoint of this project or an official MiniMind2 .pth",
    )
    p.add_argument(
        "--logit-shift",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="predict each position from the one before it, keeping the AR head's meaning (default: on with "
        "--init-from-minimind, off from scratch; a resumed run keeps its own)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="block diffusion at every step (BD3LM: causal across blocks, bidirectional within); the model then "
        "decodes block-causally with this block size. 0 (the default): the whole row",
    )
    p.add_argument(
        "--position-masking",
        type=float,
        default=0.0,
        help="mask later positions of a block more often (Efficient-DLM), with this strength (0: off)",
    )


def _add_objective_flags(p: argparse.ArgumentParser) -> None:
    """The training objective: LLaDA Eq. 3 and its variants."""
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


def _add_curriculum_flags(p: argparse.ArgumentParser) -> None:
    """LLaDA 2.0's block-size curriculum and the top-k checkpoints kept for merging."""
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
        "--keep-top-k",
        type=int,
        default=0,
        help="keep the K best evaluations' weights (for scripts.train.merge_checkpoints)",
    )


def check_flags(args) -> None:
    if not args.train:
        raise NanoLladaError(
            "pass --train to train; to generate from a checkpoint use `uv run python -m scripts.eval.eval_diffusion`"
        )
    check_training_flags(args)
    if args.use_block_curriculum and args.mask_schedule != "wsd":
        raise NanoLladaError("--use-block-curriculum is the block-size schedule of --mask-schedule wsd; pass both")
    positive("--inference-block-size", args.inference_block_size)
    if args.block_size:
        positive("--block-size", args.block_size)
        if args.use_block_curriculum:
            raise NanoLladaError("--block-size fixes the block; --use-block-curriculum varies it: pass one of them")
        if args.seq_len % args.block_size:
            raise NanoLladaError(f"--block-size {args.block_size} does not divide --seq-len {args.seq_len}")
    positive("--position-masking", args.position_masking, allow_zero=True)
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
    with flag_names():
        return BlockCurriculum(args.seq_len, steps, tuple(up), tuple(down), tuple(args.wsd_phase_ratios))


def initial_model(args, tokenizer, files: RunFiles) -> Transformer:
    """Resume the run, or copy an AR model (every tensor, RoPE setting kept), or start fresh from the flags."""
    if args.resume:
        checkpoint = starting_checkpoint(args, tokenizer, files.full, "diffusion")  # refuses changed shape flags
        if args.logit_shift is not None and args.logit_shift != checkpoint.config.logit_shift:
            raise NanoLladaError(
                f"{files.full} was trained with logit_shift={checkpoint.config.logit_shift}; drop --logit-shift / "
                "--no-logit-shift to resume it, or start a new --run-name"
            )
        return build_model(checkpoint, files.full)
    if args.init_from_minimind is None:
        config = model_config_from_args(args, vocab_size=len(tokenizer))
        config.logit_shift = bool(args.logit_shift)
        return Transformer(config)
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
    model.config.logit_shift = CONVERSION_LOGIT_SHIFT if args.logit_shift is None else args.logit_shift
    print(
        f"initialised from {source} ({checkpoint.source}): all {len(checkpoint.state_dict)} tensors copied "
        f"(embedding {tuple(model.model.embed_tokens.weight.shape)}, "
        f"head {'tied' if config.tie_word_embeddings else 'untied'}), <|mask|> row = mean embedding + noise; "
        f"conversion: {describe_conversion(args, model.config.logit_shift)}"
    )
    return model


# What --init-from-minimind does unless told otherwise: chosen by the conversion table of technical_report.md
# (bidirectional attention with the logit shift; --block-size 32 trades twice the compute per step for likelihood).
CONVERSION_LOGIT_SHIFT = True


def describe_conversion(args, logit_shift: bool) -> str:
    shift = "logit shift (position i predicted at i - 1, the AR head kept)" if logit_shift else "no logit shift"
    if args.block_size:
        attention = f"block-wise attention, blocks of {args.block_size} (causal across, bidirectional within)"
    elif args.use_block_curriculum:
        attention = "the block-size curriculum's attention"
    else:
        attention = "bidirectional attention"
    positional = f", position-dependent masking {args.position_masking:g}" if args.position_masking else ""
    return f"{shift}, {attention}{positional}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_flags(args)
    args.block_size = args.block_size or None  # 0 and None: the whole row, bidirectional
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
            "logit_shift": model.config.logit_shift,
            "block_size": args.block_size,
            "position_masking": args.position_masking,
            "validation": "LLaDA Eq. 3 (1/t)" + (f", blocks of {args.block_size}" if args.block_size else ""),
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
    if args.block_size:  # decodes block-causally with it (model.objectives.block_curriculum.trained_block_size)
        extra["block_diffusion"] = {"block_size": args.block_size}

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
    masks = bool(curriculum or args.block_size or args.use_doc_attention_mask)  # else no FlexAttention probe
    task = Task(batches.batch, val_batches, train_loss, validation_loss, explicit_masks=masks)
    options = RunOptions(tokenizer_identity(tokenizer), args.resume, extra, on_eval=keep_if_top_k)
    summary = train(model, cfg, task, options, device)
    if keeper is not None:
        print(
            f"kept the {len(keeper.entries)} best evaluations in {keeper.index}; merge them with "
            f"`uv run python -m scripts.train.merge_checkpoints --run-name {args.run_name} "
            f"--save-dir {args.save_dir} --k {args.keep_top_k}`"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
