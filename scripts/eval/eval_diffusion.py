"""Diffusion evaluation: LLaDA sampling from a prompt, held-out NELBO, conditional log-likelihood.

uv run python -m scripts.eval.eval_diffusion --checkpoint weights/diffusion_from_ar_eq3_best.pt \
    --tokenizer-dir . --seq-len 256 --prompt "请介绍你自己。" --max-new-tokens 200

A checkpoint trained with block diffusion (the warmup/decay phases of the WSD block curriculum, or a merge of such
checkpoints) is decoded block-causally with an exact KV cache of the prompt and the finished blocks, at the block
size it was trained with (--decoding overrides this).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch

from model.checkpoint import decodes_causally
from model.errors import NanoLladaError
from model.inference.likelihood import conditional_log_likelihood, diffusion_nelbo
from model.inference.sampling import DECODINGS, diffusion_generate, strip_after_eos
from model.inference.speculative import SpeculativeConfig, speculative_generate
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import EOS_ID, decode, encode, mask_token_id, prompt_ids
from scripts.common.cli import parse, pick_device, run_main
from scripts.common.device import autocast, timed
from scripts.common.evaluation.loading import HeldOutRows, load_checkpoint_for_eval
from scripts.common.evaluation.sampler_flags import (
    PromptAndHeldOut,
    SamplerFlags,
    check_sample_length,
    checked_sampler,
    generation_length,
)
from scripts.common.settings import add_flags, flag, settings_from


@dataclass
class Estimates:
    """What eval_diffusion estimates besides the sample: the held-out NELBO's draws, a conditional log-likelihood."""

    mc_samples: int = flag(8, "Monte-Carlo mask draws per batch for --eval-data", low=1)
    cond_ll_prompt: str | None = flag(None, "prompt for the conditional log-likelihood (default: --prompt)")
    cond_ll_response: str | None = flag(None, "report the Monte-Carlo log p(response | prompt)")
    cond_ll_nmc: int = flag(128, "Monte-Carlo samples for --cond-ll-response", low=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="diffusion checkpoint (.pt, full, _best or _state_dict)")
    p.add_argument("--tokenizer-dir", default=".")
    add_flags(p, PromptAndHeldOut)
    add_flags(p, Estimates)
    add_flags(p, SamplerFlags)
    decoding_help = (
        "auto: block-causal for block-diffusion checkpoints, bidirectional otherwise; speculative: the diffusion "
        "decoder drafts --block-length tokens (default 8), a causal pass verifies them: AR greedy output, exactly"
    )
    p.add_argument("--decoding", choices=(*DECODINGS, "speculative"), default="auto", help=decoding_help)
    p.add_argument("--no-kv-cache", action="store_true", help="block-causal decoding without its exact KV cache")
    p.add_argument("--no-early-stop", action="store_true", help="decode the whole canvas even after every row's EOS")
    return parse(p, argv)


def speculative_sample(model, tokenizer, args, device, checkpoint) -> dict:
    """--decoding speculative: self-speculative decoding (model/inference/speculative.py), AR greedy output."""
    if not decodes_causally(checkpoint):
        print("note: not trained with --ar-loss-weight: its AR greedy output is what speculation reproduces")
    ids, config = prompt_ids(tokenizer, args.prompt, args.chat), SpeculativeConfig(args.block_size or 8)
    mask_id = mask_token_id(tokenizer)

    def run():
        return speculative_generate(model, [ids], args.max_new_tokens, mask_id, config, EOS_ID, banned_ids=(mask_id,))

    with autocast(device, args.dtype):
        out, elapsed = timed(run, device)
    tokens = strip_after_eos(out.tokens[0], EOS_ID)
    print(args.prompt + decode(tokenizer, tokens))
    accepted = sum(out.accepted) / max(len(out.accepted), 1)
    print(
        f"[{len(tokens)} tokens in {elapsed:.2f} s = {len(tokens) / elapsed:.1f} tokens/s, {out.draft_forwards} draft "
        f"+ {out.verify_forwards} verify forwards, {len(out.tokens[0]) / out.forwards:.2f} tokens/forward, "
        f"{accepted:.2f} drafts accepted per verify (block {config.draft_length}), {device}]"
    )
    return {"tokens": tokens, "seconds": elapsed, "nfe": out.forwards, "accepted": out.accepted}


def sample(model, tokenizer, args, device, checkpoint) -> dict:
    if args.decoding == "speculative":
        return speculative_sample(model, tokenizer, args, device, checkpoint)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    gen_length = generation_length(len(ids), args.seq_len, args.max_new_tokens)
    if gen_length < args.max_new_tokens:
        print(
            f"note: --max-new-tokens {args.max_new_tokens} lowered to {gen_length} so that prompt + generation fit "
            f"--seq-len {args.seq_len}"
        )
    asked = settings_from(SamplerFlags, args).asked(
        gen_length, stop_at_eos=not args.no_early_stop, use_kv_cache=not args.no_kv_cache
    )
    # an explicit --block-length wins over the trained one
    sampler = checked_sampler(
        asked, checkpoint, args.decoding, trained_block_override=args.block_size, prompt_len=len(ids)
    )
    trained = trained_block_size(checkpoint.extra)
    if sampler.block_causal:
        print(f"block-causal decoding, block {sampler.block_size}, {'no ' if args.no_kv_cache else ''}KV cache")
        if trained and sampler.block_size != trained:
            print(f"note: decoding with --block-length {sampler.block_size}; the checkpoint was trained with {trained}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    canvas = torch.tensor([ids], device=device)
    with autocast(device, args.dtype):
        out, elapsed = timed(
            lambda: diffusion_generate(model, canvas, sampler, mask_token_id(tokenizer), EOS_ID, generator), device
        )
    raw = out.tokens[0].tolist()
    kept = raw if args.show_special else strip_after_eos(raw, EOS_ID)
    print(args.prompt + decode(tokenizer, kept, skip_special_tokens=not args.show_special))
    counted = len(strip_after_eos(raw, EOS_ID))  # EOS padding is not output
    print(
        f"[{counted} tokens (canvas {gen_length}) in {elapsed:.2f} s = {counted / elapsed:.1f} tokens/s, "
        f"NFE {out.nfe}, {counted / max(out.nfe, 1):.2f} tokens/forward, {device}]"
    )
    return {"tokens": kept, "seconds": elapsed, "nfe": out.nfe, "block_causal": sampler.block_causal}


def check_speculative_flags(args) -> None:
    """Self-speculation decodes AR greedy with drafts of --block-length tokens: refuse the sampler flags it ignores."""
    if args.decoding != "speculative":
        return
    ignored = [f.name for f in fields(SamplerFlags) if f.name != "block_size" and getattr(args, f.name) != f.default]
    if ignored:
        names = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise NanoLladaError(f"--decoding speculative gives AR greedy output: {names} does not apply to it; drop it")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_speculative_flags(args)
    estimating = bool(args.eval_data) or args.cond_ll_response is not None
    check_sample_length(args.max_new_tokens, estimating, "--eval-data or --cond-ll-response")
    device = pick_device(args.device)
    model, tokenizer, checkpoint = load_checkpoint_for_eval(args.checkpoint, args.tokenizer_dir, "diffusion", device)
    mask_id = mask_token_id(tokenizer)
    result: dict = {}
    block_size = trained_block_size(checkpoint.extra)  # block-trained: every estimate below is the block one
    if args.max_new_tokens:
        result["sample"] = sample(model, tokenizer, args, device, checkpoint)
    if args.eval_data:
        batches = settings_from(HeldOutRows, args).batches(tokenizer)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        means, errors = [], []
        with autocast(device, args.dtype):
            for batch in batches:
                mean, stderr = diffusion_nelbo(
                    model, batch.to(device), mask_id, args.mc_samples, generator, block_size=block_size
                )
                means.append(mean), errors.append(stderr)
        nelbo = sum(means) / len(means)
        stderr = (sum(e * e for e in errors) ** 0.5) / len(errors)
        print(
            f"eval {args.eval_data}: {sum(b.numel() for b in batches):,} tokens, "
            f"NELBO {nelbo:.4f} ± {stderr:.4f} nats/token "
            f"(upper bound on NLL; {args.mc_samples} mask draws per batch, seed {args.seed})"
        )
        result["eval"] = {"nelbo": nelbo, "stderr": stderr}
    if args.cond_ll_response is not None:
        prompt = prompt_ids(tokenizer, args.prompt if args.cond_ll_prompt is None else args.cond_ll_prompt, args.chat)
        answer = encode(tokenizer, args.cond_ll_response) + [EOS_ID]
        # tail_id: the answer is complete, so the rest of its block is the EOS padding of block SFT
        estimator = dict(generator=torch.Generator().manual_seed(args.seed), block_size=block_size, tail_id=EOS_ID)
        with autocast(device, args.dtype):
            value, stderr = conditional_log_likelihood(model, prompt, answer, mask_id, args.cond_ll_nmc, **estimator)
        print(
            f"log p(response + EOS | prompt) ≈ {value:.3f} ± {stderr:.3f} nats "
            f"({len(answer)} tokens, {args.cond_ll_nmc} MC samples)"
        )
        result["cond_ll"] = {"value": value, "stderr": stderr}
    return result


if __name__ == "__main__":
    run_main(main)
