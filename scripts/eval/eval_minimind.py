"""AR evaluation: KV-cached generation from a prompt, and held-out loss / perplexity with --eval-data.

uv run python -m scripts.eval.eval_minimind --checkpoint weights/minimind_pretrain_state_dict.pt \
    --tokenizer-dir . --prompt "请介绍你自己。" --max-new-tokens 200
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace

import torch

from model.inference.ar import ARSamplerConfig, generate
from model.objectives.ar_loss import next_token_loss
from model.tokenizer import EOS_ID, StreamingDecoder, mask_token_id, prompt_ids
from scripts.common.cli import Bounded, flag_names, parse, pick_device, run_main
from scripts.common.device import autocast
from scripts.common.evaluation.loading import HeldOutRows, add_checkpoint_flags, load_checkpoint_for_eval
from scripts.common.evaluation.sampler_flags import PromptAndHeldOut, check_sample_length
from scripts.common.settings import add_flags, settings_from


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "AR checkpoint (.pt, full or _state_dict) or an official MiniMind2 .pth")
    add_flags(p, PromptAndHeldOut, eval_max_batches=50)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, action=Bounded, low=0, default=20, help="0 = off")
    p.add_argument("--top-p", type=float, action=Bounded, low=0, high=1, above_low=True, default=1.0)
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole prefix for every token (for comparison)"
    )
    return parse(p, argv)


@torch.no_grad()
def held_out_loss(model, batches: list, device, dtype: str) -> dict:
    """Token-weighted mean next-token loss over held-out rows, and its perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        with autocast(device, dtype):
            loss = next_token_loss(model, batch.to(device))
        total, count = total + loss.item() * batch[:, 1:].numel(), count + batch[:, 1:].numel()
    return {"tokens": count, "loss": total / count, "perplexity": math.exp(total / count)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_sample_length(args.max_new_tokens, bool(args.eval_data), "--eval-data")
    sampler = ARSamplerConfig(args.temperature, args.top_k, args.top_p)
    with flag_names():  # the same check as the server's request fields
        sampler.check_arguments(args.max_new_tokens or None)
    device = pick_device(args.device)
    loaded = load_checkpoint_for_eval(args.checkpoint, args.tokenizer_dir, "ar", device, args.num_attention_heads)
    model, tokenizer = loaded[:2]
    result: dict = {}
    if args.max_new_tokens:
        ids = prompt_ids(tokenizer, args.prompt, args.chat)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        stream = StreamingDecoder(tokenizer, skip_special_tokens=not args.show_special)
        print(args.prompt, end="", flush=True)
        new_ids = []
        start = time.perf_counter()
        with autocast(device, args.dtype):
            for token in generate(
                model,
                ids,
                args.max_new_tokens,
                replace(sampler, banned_ids=(mask_token_id(tokenizer),)),
                EOS_ID,
                use_cache=not args.no_cache,
                generator=generator,
            ):
                new_ids.append(token)
                sys.stdout.write(stream.push([token]))
                sys.stdout.flush()
        elapsed = time.perf_counter() - start
        print(
            f"\n[{len(new_ids)} new tokens in {elapsed:.2f} s = {len(new_ids) / elapsed:.1f} tokens/s, "
            f"{len(new_ids)} forward passes, {'no cache' if args.no_cache else 'KV cache'}, {device}]"
        )
        result.update(new_tokens=new_ids, seconds=elapsed)
    if args.eval_data:
        batches = settings_from(HeldOutRows, args).batches(tokenizer)
        stats = held_out_loss(model, batches, device, args.dtype)
        print(
            f"eval {args.eval_data}: {stats['tokens']:,} predicted tokens, mean loss {stats['loss']:.4f}, "
            f"perplexity {stats['perplexity']:.2f}"
        )
        result["eval"] = stats
    return result


if __name__ == "__main__":
    run_main(main)
