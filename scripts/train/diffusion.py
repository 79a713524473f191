"""LLaDA masked-diffusion pretraining, from scratch or initialised from an AR model (--init-from-minimind).

uv run python -m scripts.train.diffusion --train --use-tokenizer --tokenizer-dir . \
    --data ./dataset/pretrain_hq.jsonl --seq-len 256 --mask-schedule iid_t \
    --init-from-minimind weights/minimind_pretrain_state_dict.pt --run-name diffusion_from_ar_eq3 --max-iters 40000

LLaDA 2.0 switches (model/block_diffusion.py):
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

from model.block_diffusion import (
    SCHEDULES,
    STABLE,
    BlockCurriculum,
    bdlm_loss,
    default_sizes_down,
    default_sizes_up,
    mdlm_loss,
)
from model.checkpoint import build_model, read_checkpoint, save_checkpoint
from model.diffusion import cut_to_random_length, init_mask_embedding, llada_loss
from model.errors import NanoLladaError
from model.tokenizer import load_tokenizer, mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import model_config_from_args, pick_device, positive, run_main
from scripts.common.distributed import main_process_first
from scripts.common.evaluation import check_compatible
from scripts.common.packing import document_ids
from scripts.common.pretraining import (
    add_pretraining_flags,
    check_pretraining_flags,
    describe,
    packed_data,
    train_config,
)
from scripts.common.trainer import RunFiles, train
from scripts.train.merge_checkpoints import TopKCheckpoints


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
        p,
        run_name="diffusion",
        learning_rate=4e-4,
        lr_schedule="wsd",
        warmup_steps=1000,
        min_lr_ratio=0.1,
        batch_size=64,
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
        "--variable-length-prob", type=float, default=0.01, help="probability a training row is cut to a random length"
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
    check_pretraining_flags(args)
    if args.use_block_curriculum and args.mask_schedule != "wsd":
        raise NanoLladaError("--use-block-curriculum is the block-size schedule of --mask-schedule wsd; pass both")
    if args.repeat_penalty_weight and llada2_objective(args):
        raise NanoLladaError(
            "--repeat-penalty-weight is only implemented for the plain LLaDA loss; drop it or the LLaDA 2.0 switches"
        )
    positive("--inference-block-size", args.inference_block_size)
    positive("--keep-top-k", args.keep_top_k, allow_zero=True)
    if not 0 < args.iid_mask_eps < 0.5:
        raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {args.iid_mask_eps}")
    if not 0 <= args.variable_length_prob <= 1:
        raise NanoLladaError(f"--variable-length-prob must lie in [0, 1], got {args.variable_length_prob}")


def llada2_objective(args) -> bool:
    """Whether the loss needs model/block_diffusion.py (otherwise the original LLaDA Eq. 3 path runs unchanged)."""
    return args.use_block_curriculum or args.time_weighted_loss or args.use_doc_attention_mask


def block_curriculum(args, steps: int) -> BlockCurriculum | None:
    if not args.use_block_curriculum:
        return None
    up = args.wsd_block_sizes_up or default_sizes_up(args.seq_len)
    down = args.wsd_block_sizes_down or default_sizes_down(args.seq_len, min(args.inference_block_size, args.seq_len))
    return BlockCurriculum(args.seq_len, steps, tuple(up), tuple(down), tuple(args.wsd_phase_ratios))


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
            f"{', '.join(f'{n}={getattr(config, n)}' for n in ignored)}, and the diffusion model keeps its shape and RoPE setting"
        )
    model = build_model(checkpoint, source)
    init_mask_embedding(model, mask_token_id(tokenizer), torch.Generator().manual_seed(args.seed))
    print(
        f"initialised from {source} ({checkpoint.source}): all {len(checkpoint.state_dict)} tensors copied "
        f"(embedding {tuple(model.model.embed_tokens.weight.shape)}, head {'tied' if config.tie_word_embeddings else 'untied'}), "
        f"<|mask|> row = mean embedding + noise, attention now bidirectional"
    )
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_flags(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    with main_process_first():  # under torchrun, rank 0 writes the token cache the others read
        batches, val_batches, steps = packed_data(args, tokenizer)
    curriculum = block_curriculum(args, steps)  # checked before any model is built
    cfg = train_config(args, "diffusion", steps, device)
    model = initial_model(args, tokenizer, RunFiles(cfg))
    mask_id = mask_token_id(tokenizer)
    schedule = args.time_weight_schedule if args.time_weighted_loss else "linear"
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
            "time_weight_schedule": schedule,
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

    def train_loss(m, rows, rng, k):
        rows = cut_to_random_length(rows, args.variable_length_prob, rng)
        if not llada2_objective(args):
            return llada_loss(
                m, rows, rng, mask_id, args.iid_mask_eps, repeat_penalty_weight=args.repeat_penalty_weight
            )
        docs = document_ids(rows) if args.use_doc_attention_mask else None
        phase, block_size = curriculum.at(k // args.accumulation_steps) if curriculum else (STABLE, args.seq_len)
        if phase == STABLE:  # block = whole row: the cheaper L-token MDLM forward (no clean copy needed)
            loss = mdlm_loss(m, rows, rng, mask_id, args.iid_mask_eps, schedule, docs)
        else:
            loss = bdlm_loss(m, rows, rng, mask_id, block_size, args.iid_mask_eps, schedule, docs)
        return (loss, {"phase": phase, "block": block_size}) if curriculum else loss

    def validation_loss(m, rows, rng):
        """LLaDA Eq. 3 in every phase (old bug B11: train and val objectives differed); fixed seeds per batch."""
        if not llada2_objective(args):
            return llada_loss(
                m, rows, rng, mask_id, args.iid_mask_eps, repeat_penalty_weight=args.repeat_penalty_weight
            )
        return mdlm_loss(
            m,
            rows,
            rng,
            mask_id,
            args.iid_mask_eps,
            "linear",
            document_ids(rows) if args.use_doc_attention_mask else None,
        )

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

    def loss_fn(m, batch, rng):
        k, rows = batch  # k: the micro-step, so the curriculum is a pure function of the step
        if not m.training:
            return validation_loss(m, rows, rng)
        return train_loss(m, rows, rng, k)

    objective = (
        "LLaDA Eq. 3"
        if not llada2_objective(args)
        else (
            f"LLaDA 2.0: {'WSD block curriculum ' + describe_curriculum(curriculum) if curriculum else 'MDLM'}, "
            f"{schedule} time weight{', document mask' if args.use_doc_attention_mask else ''}"
        )
    )
    print(describe(f"diffusion ({objective})", model, batches, val_batches, steps, device))
    summary = train(
        model,
        model.config,
        cfg,
        lambda k: (k, batches.batch(k)),
        [(-1, rows) for rows in val_batches],
        loss_fn,
        tokenizer_identity(tokenizer),
        device,
        resume=args.resume,
        extra_meta=extra,
        on_eval=keep_if_top_k,
        tokens_in=lambda batch: batch[1].numel(),
        to_device=lambda batch, dev: (batch[0], batch[1].to(dev, non_blocking=True)),
    )
    if keeper is not None:
        print(
            f"kept the {len(keeper.entries)} best evaluations in {keeper.index}; merge them with "
            f"`uv run python -m scripts.train.merge_checkpoints --run-name {args.run_name} --save-dir {args.save_dir} --k {args.keep_top_k}`"
        )
    return summary


def describe_curriculum(curriculum: BlockCurriculum) -> str:
    stable_start, decay_start = curriculum.boundaries()
    return (
        f"(warmup steps 0-{stable_start - 1} blocks {list(curriculum.sizes_up)}, stable to {decay_start - 1} block {curriculum.seq_len}, "
        f"decay blocks {list(curriculum.sizes_down)})"
    )


if __name__ == "__main__":
    run_main(main)
