"""Diffusion evaluation: LLaDA sampling from a prompt, held-out NELBO, conditional log-likelihood.

uv run python -m scripts.eval.eval_diffusion --checkpoint weights/diffusion_from_ar_eq3_best.pt \
    --tokenizer-dir . --seq-len 256 --prompt "请介绍你自己。" --max-new-tokens 200

A checkpoint trained with block diffusion (the warmup/decay phases of the WSD block curriculum, or a merge of such
checkpoints) is decoded block-causally with an exact KV cache of the prompt and the finished blocks, at the block
size it was trained with (--decoding overrides this).
"""

from __future__ import annotations

import argparse
import time

import torch

from model.block_diffusion import trained_block_size
from model.errors import NanoLladaError
from model.likelihood import conditional_log_likelihood, diffusion_nelbo
from model.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.tokenizer import EOS_ID, decode, encode, mask_token_id, prompt_ids
from scripts.common.cli import pick_device, positive, run_main
from scripts.common.evaluation import held_out_batches, load_checkpoint_for_eval
from scripts.common.trainer import autocast


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="diffusion checkpoint (.pt, full, _best or _state_dict)")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument(
        "--seq-len", type=int, default=256, help="canvas limit: prompt + generation (the trained row length)"
    )
    p.add_argument("--prompt", default="请介绍你自己。")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (for SFT models)"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--gen-steps", type=int, default=None, help="forward passes over all blocks (default: one per token)"
    )
    p.add_argument("--block-length", type=int, default=None, help="semi-autoregressive block size (default: one block)")
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--temperature", type=float, default=0.0, help="Gumbel-max sampling temperature; 0 = greedy")
    p.add_argument(
        "--gen-cfg-scale", type=float, default=0.0, help="unsupervised classifier-free guidance weight (0 = off)"
    )
    p.add_argument(
        "--cache",
        choices=["none", "prefix", "dual"],
        default="none",
        help="Fast-dLLM approximate K/V cache for bidirectional models, refreshed once per block",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="parallel decoding: commit every token with confidence >= this"
    )
    p.add_argument(
        "--decoding",
        choices=["auto", "bidirectional", "block-causal"],
        default="auto",
        help="auto: block-causal for block-diffusion checkpoints, bidirectional otherwise",
    )
    p.add_argument(
        "--no-kv-cache", action="store_true", help="block-causal decoding without the (exact) KV cache, for checking"
    )
    p.add_argument(
        "--no-early-stop", action="store_true", help="decode the whole canvas even after every row produced EOS"
    )
    p.add_argument("--show-special", action="store_true", help="print the raw output including EOS padding")
    p.add_argument("--eval-data", default=None, help="held-out jsonl/txt: per-token NELBO (upper bound on the NLL)")
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-max-batches", type=int, default=10)
    p.add_argument("--mc-samples", type=int, default=8, help="Monte-Carlo mask draws per batch for --eval-data")
    p.add_argument(
        "--cond-ll-prompt", default=None, help="prompt for the conditional log-likelihood (default: --prompt)"
    )
    p.add_argument("--cond-ll-response", default=None, help="report the Monte-Carlo log p(response | prompt)")
    p.add_argument("--cond-ll-nmc", type=int, default=128, help="Monte-Carlo samples for --cond-ll-response")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=2026)
    return p.parse_args(argv)


def decoding_mode(args, checkpoint_block_size: int | None) -> tuple[bool, int | None]:
    """(block-causal?, block length) from --decoding and the block size the checkpoint was trained with."""
    block_causal = args.decoding == "block-causal" or (args.decoding == "auto" and checkpoint_block_size is not None)
    if not block_causal:
        return False, args.block_length
    block_length = args.block_length or checkpoint_block_size
    if block_length is None:
        raise NanoLladaError(
            "--decoding block-causal: this checkpoint was not trained with block diffusion; pass --block-length"
        )
    if args.block_length and checkpoint_block_size and args.block_length != checkpoint_block_size:
        print(
            f"note: decoding with --block-length {args.block_length}; the checkpoint was trained with block size {checkpoint_block_size}"
        )
    return True, block_length


def sample(model, tokenizer, args, device, checkpoint_block_size: int | None = None) -> dict:
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    room = args.seq_len - len(ids)
    if room <= 0:
        raise NanoLladaError(
            f"the prompt is {len(ids)} tokens, which leaves no room in --seq-len {args.seq_len}; shorten it or raise --seq-len"
        )
    gen_length = args.max_new_tokens
    if gen_length > room:
        print(
            f"note: --max-new-tokens {gen_length} lowered to {room} so that prompt + generation fit --seq-len {args.seq_len}"
        )
        gen_length = room
    block_causal, block_length = decoding_mode(args, checkpoint_block_size)
    if block_causal:
        print(f"block-causal decoding, block {block_length}, {'no ' if args.no_kv_cache else ''}KV cache")
    cfg = DiffusionSamplerConfig(
        gen_length=gen_length,
        steps=args.gen_steps or gen_length,
        block_length=block_length,
        temperature=args.temperature,
        remasking=args.remasking,
        cfg_scale=args.gen_cfg_scale,
        threshold=args.threshold,
        stop_at_eos=not args.no_early_stop,
        block_causal=block_causal,
        use_kv_cache=not args.no_kv_cache,
        cache="none" if block_causal else args.cache,
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([ids], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast(device, args.dtype):
        out = diffusion_generate(model, prompt, cfg, mask_token_id(tokenizer), EOS_ID, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    raw = out.tokens[0].tolist()
    kept = raw if args.show_special else strip_after_eos(raw, EOS_ID)
    print(args.prompt + decode(tokenizer, kept, skip_special_tokens=not args.show_special))
    counted = len(strip_after_eos(raw, EOS_ID))  # EOS padding is not output
    print(
        f"[{counted} tokens (canvas {gen_length}) in {elapsed:.2f} s = {counted / elapsed:.1f} tokens/s, "
        f"NFE {out.nfe}, {counted / max(out.nfe, 1):.2f} tokens/forward, {device}]"
    )
    return {"tokens": kept, "seconds": elapsed, "nfe": out.nfe, "block_causal": block_causal}


def main(argv=None) -> dict:
    args = parse_args(argv)
    positive("--max-new-tokens", args.max_new_tokens, allow_zero=True)
    positive("--seq-len", args.seq_len)
    device = pick_device(args.device)
    model, tokenizer, checkpoint = load_checkpoint_for_eval(args.checkpoint, args.tokenizer_dir, "diffusion", device)
    mask_id = mask_token_id(tokenizer)
    result: dict = {}
    if args.max_new_tokens:
        block_size = trained_block_size(checkpoint.extra)
        result["sample"] = sample(model, tokenizer, args, device, block_size)
    if args.eval_data:
        batches = held_out_batches(
            args.eval_data, tokenizer, args.jsonl_field, args.seq_len, args.eval_batch_size, args.eval_max_batches
        )
        generator = torch.Generator(device=device).manual_seed(args.seed)
        means, errors = [], []
        with autocast(device, args.dtype):
            for batch in batches:
                mean, stderr = diffusion_nelbo(model, batch.to(device), mask_id, args.mc_samples, generator)
                means.append(mean), errors.append(stderr)
        nelbo = sum(means) / len(means)
        stderr = (sum(e * e for e in errors) ** 0.5) / len(errors)
        print(
            f"eval {args.eval_data}: {sum(b.numel() for b in batches):,} tokens, NELBO {nelbo:.4f} ± {stderr:.4f} nats/token "
            f"(upper bound on NLL; {args.mc_samples} mask draws per batch, seed {args.seed})"
        )
        result["eval"] = {"nelbo": nelbo, "stderr": stderr}
    if args.cond_ll_response is not None:
        prompt = prompt_ids(
            tokenizer, args.cond_ll_prompt if args.cond_ll_prompt is not None else args.prompt, args.chat
        )
        answer = encode(tokenizer, args.cond_ll_response) + [EOS_ID]
        with autocast(device, args.dtype):
            value, stderr = conditional_log_likelihood(
                model, prompt, answer, mask_id, args.cond_ll_nmc, generator=torch.Generator().manual_seed(args.seed)
            )
        print(
            f"log p(response + EOS | prompt) ≈ {value:.3f} ± {stderr:.3f} nats ({len(answer)} tokens, {args.cond_ll_nmc} MC samples)"
        )
        result["cond_ll"] = {"value": value, "stderr": stderr}
    return result


if __name__ == "__main__":
    run_main(main)
