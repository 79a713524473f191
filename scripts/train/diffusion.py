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

from model.checkpoint import build_model, check_compatible, joint_record, read_checkpoint
from model.errors import NanoLladaError
from model.objectives.block_curriculum import BlockCurriculum, default_sizes_down, default_sizes_up
from model.objectives.conversion import init_mask_embedding
from model.tokenizer import mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import flag_names, parse, run_main
from scripts.common.settings import add_flags, settings_from
from scripts.common.training.diffusion_pretraining import DiffusionSettings, PretrainingLoss
from scripts.common.training.flags import TrainingFlags, start_run, starting_checkpoint
from scripts.common.training.pretraining import Corpus, add_pretraining_flags, describe, packed_data
from scripts.common.training.run_files import RunFiles
from scripts.common.training.topk import TopKCheckpoints
from scripts.common.training.trainer import RunOptions, Task, train

# What --init-from-minimind does unless told otherwise: chosen by the conversion table of technical_report.md
# (bidirectional attention with the logit shift; --block-size 32 trades twice the compute per step for likelihood).
CONVERSION_LOGIT_SHIFT = True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train (required; to generate use scripts.eval.eval_diffusion)")
    p.add_argument(
        "--use-tokenizer", action="store_true", help="accepted for compatibility: training always uses --tokenizer-dir"
    )
    add_pretraining_flags(
        p, run_name="diffusion", batch_size=64, learning_rate=4e-4, lr_schedule="wsd", warmup_steps=1000
    )
    add_flags(p, DiffusionSettings)
    return parse(p, argv)


def settings(argv=None) -> TrainingFlags:
    """The command line, typed and checked."""
    args = parse_args(argv)
    if not args.train:
        raise NanoLladaError(
            "pass --train to train; to generate from a checkpoint use `uv run python -m scripts.eval.eval_diffusion`"
        )
    own = settings_from(DiffusionSettings, args, corpus=settings_from(Corpus, args))
    flags = TrainingFlags.from_args(args, "diffusion", own)
    check(own, flags.run.seq_len)
    own.block_size = own.block_size or None  # 0 and None: the whole row, bidirectional
    return flags


def check(s: DiffusionSettings, seq_len: int) -> None:
    if s.use_block_curriculum and s.mask_schedule != "wsd":
        raise NanoLladaError("--use-block-curriculum is the block-size schedule of --mask-schedule wsd; pass both")
    if s.block_size:
        if s.use_block_curriculum:
            raise NanoLladaError("--block-size fixes the block; --use-block-curriculum varies it: pass one of them")
        if seq_len % s.block_size:
            raise NanoLladaError(f"--block-size {s.block_size} does not divide --seq-len {seq_len}")
    if not 0 < s.iid_mask_eps < 0.5:
        raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {s.iid_mask_eps}")
    if not 0 <= s.variable_length_prob <= 1:
        raise NanoLladaError(f"--variable-length-prob must lie in [0, 1], got {s.variable_length_prob}")


def block_curriculum(s: DiffusionSettings, seq_len: int, steps: int) -> BlockCurriculum | None:
    if not s.use_block_curriculum:
        return None
    up = s.wsd_block_sizes_up or default_sizes_up(seq_len)
    down = s.wsd_block_sizes_down or default_sizes_down(seq_len, min(s.inference_block_size, seq_len))
    with flag_names():
        return BlockCurriculum(seq_len, steps, tuple(up), tuple(down), tuple(s.wsd_phase_ratios))


def initial_model(flags: TrainingFlags, tokenizer, files: RunFiles) -> Transformer:
    """Resume the run, or copy an AR model (every tensor, RoPE setting kept), or start fresh from the flags."""
    s = flags.own
    if flags.run.resume:
        checkpoint = starting_checkpoint(flags, tokenizer, files.full, "diffusion")  # refuses changed shape flags
        if s.logit_shift is not None and s.logit_shift != checkpoint.config.logit_shift:
            raise NanoLladaError(
                f"{files.full} was trained with logit_shift={checkpoint.config.logit_shift}; drop --logit-shift / "
                "--no-logit-shift to resume it, or start a new --run-name"
            )
        return build_model(checkpoint, files.full)
    requested = flags.shape.model_config(vocab_size=len(tokenizer))
    if s.init_from_minimind is None:
        requested.logit_shift = bool(s.logit_shift)
        return Transformer(requested)
    source = s.init_from_minimind
    hint = "--init-from-minimind takes an AR checkpoint (to continue a diffusion run use --resume)"
    checkpoint = check_compatible(read_checkpoint(source), source, "ar", tokenizer, flags.run.tokenizer_dir, hint=hint)
    config = checkpoint.config
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
    init_mask_embedding(model, mask_token_id(tokenizer), torch.Generator().manual_seed(flags.optimizer.seed))
    model.config.logit_shift = CONVERSION_LOGIT_SHIFT if s.logit_shift is None else s.logit_shift
    print(
        f"initialised from {source} ({checkpoint.source}): all {len(checkpoint.state_dict)} tensors copied "
        f"(embedding {tuple(model.model.embed_tokens.weight.shape)}, "
        f"head {'tied' if config.tie_word_embeddings else 'untied'}), <|mask|> row = mean embedding + noise; "
        f"conversion: {describe_conversion(s, model.config.logit_shift)}"
    )
    return model


def describe_conversion(s: DiffusionSettings, logit_shift: bool) -> str:
    shift = "logit shift (position i predicted at i - 1, the AR head kept)" if logit_shift else "no logit shift"
    if s.block_size:
        attention = f"block-wise attention, blocks of {s.block_size} (causal across, bidirectional within)"
    elif s.use_block_curriculum:
        attention = "the block-size curriculum's attention"
    else:
        attention = "bidirectional attention"
    positional = f", position-dependent masking {s.position_masking:g}" if s.position_masking else ""
    return f"{shift}, {attention}{positional}"


def run_metadata(s: DiffusionSettings, model, curriculum: BlockCurriculum | None) -> dict:
    """What the checkpoint records of the run: the objective, the conversion, and the block size it decodes with."""
    extra = {
        "diffusion": {
            "mask_schedule": s.mask_schedule,
            "iid_mask_eps": s.iid_mask_eps,
            "init_from": s.init_from_minimind,
            "time_weight_schedule": s.time_weight_schedule if s.time_weighted_loss else "linear",
            "doc_attention_mask": s.use_doc_attention_mask,
            "logit_shift": model.config.logit_shift,
            "block_size": s.block_size,
            "position_masking": s.position_masking,
            "validation": "LLaDA Eq. 3 (1/t)" + (f", blocks of {s.block_size}" if s.block_size else ""),
            "block_curriculum": None
            if curriculum is None
            else {  # its fields, the sizes as lists
                name: list(value) if isinstance(value, tuple) else value for name, value in asdict(curriculum).items()
            },
        }
    }
    if s.block_size:  # decodes block-causally with it (model.objectives.block_curriculum.trained_block_size)
        extra["block_diffusion"] = {"block_size": s.block_size}
    extra.update(joint_record(s.ar_loss_weight))  # also an AR model (model.checkpoint.decodes_causally)
    return extra


def main(argv=None) -> dict:
    flags = settings(argv)
    s, run_settings = flags.own, flags.run
    run = start_run(flags, packed_data)
    tokenizer, device, batches, val_batches, cfg = run.tokenizer, run.device, run.batches, run.val_batches, run.cfg
    curriculum = block_curriculum(s, run_settings.seq_len, cfg.max_steps)  # checked before any model is built
    model = initial_model(flags, tokenizer, RunFiles(cfg))
    if s.mask_schedule == "wsd" and curriculum is None:
        print(
            "note: --mask-schedule wsd without --use-block-curriculum keeps the block at the whole row in every phase, "
            "i.e. plain masked diffusion (LLaDA Eq. 3, as iid_t)"
        )
    resume = run_settings.resume
    keeper = TopKCheckpoints(cfg.out_dir, cfg.run_name, s.keep_top_k, resume) if s.keep_top_k else None
    extra = run_metadata(s, model, curriculum)
    loss = PretrainingLoss(s, cfg.seed, curriculum, mask_token_id(tokenizer))

    print(describe(f"diffusion ({loss.describe()})", model, batches, val_batches, cfg.max_steps, device))
    masks = bool(curriculum or s.block_size or s.use_doc_attention_mask)  # else no FlexAttention probe
    task = Task(batches.batch, val_batches, loss.train, loss.validation, explicit_masks=masks)
    options = RunOptions(tokenizer_identity(tokenizer), resume, extra, top_k=keeper)
    summary = train(model, cfg, task, options, device)
    if keeper is not None:
        print(
            f"kept the {len(keeper.entries)} best evaluations in {keeper.index}; merge them with "
            f"`uv run python -m scripts.train.merge_checkpoints --run-name {cfg.run_name} "
            f"--save-dir {cfg.out_dir} --k {s.keep_top_k}`"
        )
    return summary


if __name__ == "__main__":
    run_main(main)
