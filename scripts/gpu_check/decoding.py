"""The decoding stage of the GPU check: cached against uncached decoding under the run's autocast (bf16 on CUDA),
and ms per forward of every diffusion decoding mode, on the models the training stage wrote (random ones if it
wrote none)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from model.checkpoint import build_model, read_checkpoint
from model.config import preset
from model.inference.ar import GREEDY, generate, generate_batch
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.tokenizer import BOS_ID, PAD_ID, load_tokenizer
from model.transformer import Transformer
from scripts.common.device import autocast
from scripts.gpu_check import report
from scripts.gpu_check.report import Context


def trained_or_random(ctx: Context, run_name: str, shifted: bool = False) -> tuple[Transformer, str]:
    """The training stage's weights of `run_name`, or a random model of the check's shape with large weights (a
    0.02-init model's greedy text repeats one token, which would make any agreement meaningless)."""
    path = ctx.work / "weights" / f"{run_name}_state_dict.pt"
    if path.exists():
        return build_model(read_checkpoint(path), path).to(ctx.device).eval(), str(path)
    torch.manual_seed(0)
    model = Transformer(preset("minimind2_small" if ctx.cuda else "tiny", logit_shift=shifted)).to(ctx.device).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model, "random weights (no trained model in --work)"


def timed(ctx: Context, fn):
    """(fn()'s value, seconds), synchronised, under the run's autocast."""
    with autocast(ctx.device, "bfloat16"):
        return report.timed(fn, ctx.device)


def agreement(a: list[int], b: list[int]) -> float:
    """The share of positions before the first difference (greedy decodings agree up to a near-tie, then part)."""
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return first / max(len(a), 1)


def prompt_ids(ctx: Context, vocab_size: int, length: int = 16) -> list[int]:
    corpus = ctx.shared.get("data")
    if corpus is not None and Path(corpus).suffix == ".txt":  # the synthesised corpus: text the models learned
        line = Path(corpus).read_text(encoding="utf-8").splitlines()[0]
        return [BOS_ID, *load_tokenizer(ctx.args.tokenizer_dir).encode(line)[: length - 1]]
    g = torch.Generator().manual_seed(0)
    return [BOS_ID, *torch.randint(3, vocab_size - 1, (length - 1,), generator=g).tolist()]


def decoding_stage(ctx: Context) -> None:
    new = 64 if ctx.cuda else 16
    ctx.guarded("ar", lambda: ar_decoding(ctx, new), 5)
    ctx.guarded("diffusion", lambda: diffusion_modes(ctx, new), 5)
    ctx.guarded("block_causal", lambda: block_causal(ctx, new), 5)


def ar_decoding(ctx: Context, new: int) -> None:
    model, source = trained_or_random(ctx, "ar")
    with autocast(ctx.device, "bfloat16"):
        cache_dtype = model.new_kv_cache(1, 8).keys.dtype
    want = torch.bfloat16 if ctx.cuda else torch.float32
    ctx.verdict("kv_cache_dtype", cache_dtype == want, f"{cache_dtype} under the run's autocast")
    prompt = prompt_ids(ctx, model.config.vocab_size)
    cached, cached_s = timed(ctx, lambda: list(generate(model, prompt, new, GREEDY, use_cache=True)))
    uncached, uncached_s = timed(ctx, lambda: list(generate(model, prompt, new, GREEDY, use_cache=False)))
    share = agreement(cached, uncached)
    detail = f"greedy agreement {share:.2f} over {new} tokens; ms/token cached {1e3 * cached_s / new:.2f}, "
    detail += f"uncached {1e3 * uncached_s / new:.2f} ({source})"
    result = {"agreement": share, "cached_ms": 1e3 * cached_s / new, "uncached_ms": 1e3 * uncached_s / new}
    ctx.verdict("ar_cached_vs_uncached", share >= (0.9 if ctx.cuda else 1.0), detail, **result)
    _, batch_s = timed(ctx, lambda: generate_batch(model, [prompt] * 16, new, GREEDY, pad_id=PAD_ID))
    ms = 1e3 * batch_s / new
    ctx.check("PASS", "ar_batch16", f"{ms:.2f} ms per step of 16 rows", ms_per_step=ms)
    ctx.report.stage_result("decoding", ar=result)


def diffusion_modes(ctx: Context, new: int) -> None:
    """Threshold 0.9 decoding with no cache, Fast-dLLM's prefix and dual caches: forwards, ms/forward, tokens/s."""
    model, source = trained_or_random(ctx, "mdlm", shifted=True)
    prompt = torch.tensor([prompt_ids(ctx, model.config.vocab_size)], device=ctx.device)
    mask_id = model.config.vocab_size - 1  # <|mask|> is the last id (model.tokenizer)
    base = DiffusionSamplerConfig(gen_length=new, steps=new, block_size=new // 2, threshold=0.9)
    results, reference = {}, None
    for cache in ("none", "prefix", "dual"):
        out, seconds = timed(ctx, lambda c=cache: diffusion_generate(model, prompt, replace(base, cache=c), mask_id))
        tokens = out.tokens[0].tolist()
        reference = tokens if reference is None else reference
        r = {"forwards": out.nfe, "ms_per_forward": 1e3 * seconds / out.nfe, "tokens_per_s": new / seconds}
        r["agreement_with_none"] = agreement(tokens, reference)  # the caches approximate: for information
        results[cache] = r
        detail = f"{out.nfe} forwards, {r['ms_per_forward']:.2f} ms/forward, {r['tokens_per_s']:,.0f} tok/s, "
        ctx.check("PASS", f"diffusion.{cache}", detail + f"agreement with no cache {r['agreement_with_none']:.2f}", **r)
    ctx.report.stage_result("decoding", diffusion=results, diffusion_model=source)


def block_causal(ctx: Context, new: int) -> None:
    """Block-causal decoding of the block-diffusion model: the exact KV cache against recomputing the prefix."""
    model, source = trained_or_random(ctx, "bdlm32_doc_flex")
    block = 32 if ctx.cuda else 8
    prompt = torch.tensor([prompt_ids(ctx, model.config.vocab_size)], device=ctx.device)
    mask_id = model.config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=new, steps=new, block_size=block, threshold=0.9, block_causal=True)
    runs = {}
    for cached in (True, False):
        decode = replace(sampler, use_kv_cache=cached)
        out, seconds = timed(ctx, lambda: diffusion_generate(model, prompt, decode, mask_id))
        runs[cached] = (out.tokens[0].tolist(), out.nfe, seconds)
    share = agreement(runs[True][0], runs[False][0])
    ms = {c: 1e3 * s / n for c, (_, n, s) in runs.items()}
    detail = f"agreement {share:.2f}; ms/forward cached {ms[True]:.2f}, uncached {ms[False]:.2f} ({source})"
    ctx.verdict("block_causal_cached_vs_uncached", share >= (0.9 if ctx.cuda else 1.0), detail, agreement=share)
