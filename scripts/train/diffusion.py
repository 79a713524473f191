"""LLaDA masked-diffusion pretraining, from scratch or initialised from an AR model (--init-from-minimind).

uv run python -m scripts.train.diffusion --train --use-tokenizer --tokenizer-dir . \
    --data ./dataset/pretrain_hq.jsonl --seq-len 256 --mask-schedule iid_t \
    --init-from-minimind weights/minimind_pretrain_state_dict.pt --run-name diffusion_from_ar_eq3 --max-iters 40000
"""

from __future__ import annotations

import argparse

import torch

from model.checkpoint import KIND_NAMES, build_model, read_checkpoint
from model.diffusion import cut_to_random_length, init_mask_embedding, llada_loss
from model.errors import NanoLladaError
from model.tokenizer import check_tokenizer_matches, load_tokenizer, mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import model_config_from_args, pick_device, run_main
from scripts.common.pretraining import add_pretraining_flags, check_pretraining_flags, describe, packed_data, train_config
from scripts.common.trainer import RunFiles, train

LLADA2_FLAGS = ("use_block_curriculum", "time_weighted_loss", "use_doc_attention_mask")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train (required; to generate use scripts.eval.eval_diffusion)")
    p.add_argument("--use-tokenizer", action="store_true", help="accepted for compatibility: training always uses --tokenizer-dir")
    add_pretraining_flags(p, run_name="diffusion", learning_rate=4e-4, lr_schedule="wsd", warmup_steps=1000,
                          min_lr_ratio=0.1, batch_size=64)
    p.add_argument("--init-from-minimind", default=None, metavar="PATH",
                   help="initialise from an AR checkpoint of this project or an official MiniMind2 .pth")
    p.add_argument("--mask-schedule", choices=["iid_t", "wsd"], default="iid_t", help="iid_t: LLaDA Eq. 3")
    p.add_argument("--iid-mask-eps", type=float, default=1e-3, help="t ~ U(eps, 1 - eps)")
    p.add_argument("--variable-length-prob", type=float, default=0.01, help="probability a training row is cut to a random length")
    p.add_argument("--repeat-penalty-weight", type=float, default=0.0, help="weight of the repeat unlikelihood term")
    p.add_argument("--use-block-curriculum", action="store_true", help="LLaDA 2.0 block-size WSD curriculum (not yet supported)")
    p.add_argument("--time-weighted-loss", action="store_true", help="LLaDA 2.0 time-weighted loss (not yet supported)")
    p.add_argument("--use-doc-attention-mask", action="store_true", help="document attention mask for packed rows (not yet supported)")
    return p.parse_args(argv)


def check_flags(args) -> None:
    if not args.train:
        raise NanoLladaError("pass --train to train; to generate from a checkpoint use `uv run python -m scripts.eval.eval_diffusion`")
    check_pretraining_flags(args)
    requested = [f"--{name.replace('_', '-')}" for name in LLADA2_FLAGS if getattr(args, name)]
    if args.mask_schedule == "wsd" or requested:
        raise NanoLladaError(f"{' '.join(['--mask-schedule wsd'] * (args.mask_schedule == 'wsd') + requested)}: "
                             "the LLaDA 2.0 options are not yet supported; use --mask-schedule iid_t")
    if not 0 < args.iid_mask_eps < 0.5:
        raise NanoLladaError(f"--iid-mask-eps must lie in (0, 0.5), got {args.iid_mask_eps}")
    if not 0 <= args.variable_length_prob <= 1:
        raise NanoLladaError(f"--variable-length-prob must lie in [0, 1], got {args.variable_length_prob}")


def initial_model(args, tokenizer, files: RunFiles) -> Transformer:
    """Resume the run, or copy an AR model (every tensor, RoPE setting kept), or start fresh from the flags."""
    if args.resume:
        checkpoint = read_checkpoint(files.full)
        check_tokenizer_matches(checkpoint.tokenizer, tokenizer, files.full, args.tokenizer_dir)
        return build_model(checkpoint, files.full)
    if args.init_from_minimind is None:
        return Transformer(model_config_from_args(args, vocab_size=len(tokenizer)))
    source = args.init_from_minimind
    checkpoint = read_checkpoint(source)
    if checkpoint.kind != "ar":
        raise NanoLladaError(f"{source}: is {KIND_NAMES[checkpoint.kind]} checkpoint; --init-from-minimind takes an AR checkpoint "
                             f"(to continue a diffusion run use --resume)")
    check_tokenizer_matches(checkpoint.tokenizer, tokenizer, source, args.tokenizer_dir)
    config = checkpoint.config
    if config.vocab_size != len(tokenizer):
        raise NanoLladaError(f"{source}: vocabulary {config.vocab_size} does not fit the tokenizer in {args.tokenizer_dir} ({len(tokenizer)} with <|mask|>)")
    requested = model_config_from_args(args, vocab_size=len(tokenizer))
    ignored = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "inference_rope_scaling")
               if getattr(requested, name) != getattr(config, name)]
    if ignored:
        print(f"note: {', '.join(f'{n}={getattr(requested, n)}' for n in ignored)} ignored: the AR checkpoint has "
              f"{', '.join(f'{n}={getattr(config, n)}' for n in ignored)}, and the diffusion model keeps its shape and RoPE setting")
    model = build_model(checkpoint, source)
    init_mask_embedding(model, mask_token_id(tokenizer), torch.Generator().manual_seed(args.seed))
    print(f"initialised from {source} ({checkpoint.source}): all {len(checkpoint.state_dict)} tensors copied "
          f"(embedding {tuple(model.model.embed_tokens.weight.shape)}, head {'tied' if config.tie_word_embeddings else 'untied'}), "
          f"<|mask|> row = mean embedding + noise, attention now bidirectional")
    return model


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_flags(args)
    tokenizer = load_tokenizer(args.tokenizer_dir)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    batches, val_batches, steps = packed_data(args, tokenizer)
    cfg = train_config(args, "diffusion", steps, device)
    model = initial_model(args, tokenizer, RunFiles(cfg))
    mask_id = mask_token_id(tokenizer)

    def loss_fn(m, batch, rng):
        if m.training:  # validation always scores full rows
            batch = cut_to_random_length(batch, args.variable_length_prob, rng)
        return llada_loss(m, batch, rng, mask_id, args.iid_mask_eps, repeat_penalty_weight=args.repeat_penalty_weight)

    print(describe("diffusion (LLaDA Eq. 3)", model, batches, val_batches, steps, device))
    extra = {"diffusion": {"mask_schedule": args.mask_schedule, "iid_mask_eps": args.iid_mask_eps, "init_from": args.init_from_minimind}}
    summary = train(model, model.config, cfg, batches.batch, val_batches, loss_fn, tokenizer_identity(tokenizer), device,
                    resume=args.resume, extra_meta=extra)
    print(f"done: step {summary['step']}, best val loss {summary['best_val']:.4f} @ {summary['best_step']}; "
          f"wrote {summary['files']['full']}, {summary['files']['best']}, {summary['files']['plot']}")
    return summary


if __name__ == "__main__":
    run_main(main)
