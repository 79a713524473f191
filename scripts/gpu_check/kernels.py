"""The environment and kernels stages of the GPU check."""

from __future__ import annotations

import platform
import warnings

import torch
import torch.nn.functional as F

from model.block_attention import bd3lm_attention_mask, document_attention_mask
from model.config import ModelConfig, preset
from model.cross_entropy import IGNORE_INDEX, chunked_cross_entropy
from model.prompt_causal import prompt_causal_mask
from model.transformer import BlockMask, Transformer, block_mask_from_dense, flex_attention_kernel
from scripts.common.bench.report import peak_bf16_flops
from scripts.common.device import autocast, enable_tf32, nvidia_driver_version, unusable_gpu_reason
from scripts.gpu_check.report import Context, max_diff, timed_ms

# ----------------------------------------------------------------------------- environment


def env_stage(ctx: Context) -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "driver": nvidia_driver_version(),
    }
    reason = unusable_gpu_reason()
    if reason and ctx.args.device != "cpu":  # the one thing that makes every later number meaningless
        ctx.shared["stop"] = True
        ctx.report.stage_result("env", **info)
        ctx.check("FAIL", "cuda", reason, **info)
        return
    if ctx.cuda:
        enable_tf32(ctx.device)
        props = torch.cuda.get_device_properties(ctx.device)
        peak = peak_bf16_flops(ctx.device)
        info |= {"gpu": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
        info["bf16_peak_tflops"] = None if peak is None else peak / 1e12
        gpu = f"{props.name}, driver {info['driver']}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        ctx.check("PASS", "cuda", gpu)
        ctx.verdict("mfu_peak", peak is not None, f"bf16 peak for MFU: {info['bf16_peak_tflops']} TFLOPS")
    else:
        ctx.check("SKIP", "cuda", f"CPU mode: torch {torch.__version__}, no usable CUDA device")
    info["flex_attention"] = BlockMask is not None
    ctx.verdict("flex_import", BlockMask is not None, "torch.nn.attention.flex_attention imports")
    ctx.report.stage_result("env", **info)


# ----------------------------------------------------------------------------- kernels


def kernels_stage(ctx: Context) -> None:
    config = preset("minimind2_small" if ctx.cuda else "tiny")
    ctx.guarded("sdpa_backends", lambda: sdpa_backends(ctx, config), 5)
    ctx.guarded("flex_vs_sdpa", lambda: flex_against_sdpa(ctx, config), 10)
    ctx.guarded("cross_entropy", lambda: loss_variants(ctx, config), 10)


def _sdpa_sites(config: ModelConfig, device) -> dict:
    """The attention call sites of training and decoding: (input ids, forward kwargs, with gradients)."""
    B, L = (8, 256) if device.type == "cuda" else (2, 16)
    ids = torch.randint(3, config.vocab_size - 1, (B, L), device=device)
    real = torch.ones(B, L, dtype=torch.bool, device=device)
    real[0, L // 2 :] = False
    blocks = {"attention": bd3lm_attention_mask(L, 32 if L >= 32 else 4, device)}
    blocks["positions"] = torch.arange(L, device=device).repeat(2)  # x_t and x_0 share their positions
    prompt_causal = prompt_causal_mask(torch.full((B,), L // 4, device=device), L, real)
    return {
        "ar_causal_gqa": (ids, {"attention": "causal"}, True),
        "mdlm_bidirectional_gqa": (ids, {"attention": "bidirectional"}, True),
        "sft_key_padding_mask": (ids, {"attention": real[:, None, None, :]}, True),
        "sft_prompt_causal": (ids, {"attention": prompt_causal}, True),  # diffusion SFT's default
        "bd3lm_mask_eval": (torch.cat([ids, ids], 1), blocks, False),  # [x_t ; x_0]
    }


def sdpa_backends(ctx: Context, config: ModelConfig) -> None:
    """Which fused SDPA kernels accept each call site when the math kernel is excluded (none = silent math)."""
    from torch.nn.attention import SDPBackend

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if ctx.cuda:
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    torch.manual_seed(0)
    model = Transformer(config).to(ctx.device)
    model.flex_attention = False  # the SDPA path of each site, also where training would take FlexAttention
    found = {}
    for site, (ids, kwargs, grad) in _sdpa_sites(config, ctx.device).items():
        found[site] = [name for name, backend in backends.items() if _runs(model, ids, kwargs, grad, backend, ctx)]
        detail = ", ".join(found[site]) or "NONE (math kernel: fp32 scores)"
        if ctx.cuda:
            ctx.verdict(f"sdpa.{site}", bool(found[site]), detail, backends=found[site])
        else:  # CPU kernels say nothing about CUDA's
            ctx.check("PASS", f"sdpa.{site}", f"{detail} (CPU, for information)", backends=found[site])
    ctx.report.stage_result("kernels", sdpa_backends=found)


def _runs(model, ids, kwargs, grad: bool, backend, ctx: Context) -> bool:
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel([backend]), autocast(ctx.device, "bfloat16"), torch.set_grad_enabled(grad):
            out = model(ids, **kwargs)
            if grad:
                out.float().sum().backward()
        return True
    except RuntimeError:  # "No available kernel": this backend refuses the site
        return False
    finally:
        model.zero_grad(set_to_none=True)


def _attention_inputs(config: ModelConfig, device, L: int, dtype):
    B, heads, kv_heads, d = 4, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, heads, 2 * L, d, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, kv_heads, 2 * L, d, device=device, dtype=dtype, generator=g) for _ in range(2))
    doc_ids = torch.randint(0, 4, (B, 2 * L), device=device, generator=g).sort(1).values
    starts = torch.randint(1, 2 * L - 1, (B,), device=device, generator=g)  # where each row's answer begins
    masks = {
        "bd3lm": bd3lm_attention_mask(L, 32 if L >= 32 else 4, device),
        "document": document_attention_mask(doc_ids),
        "sft_prompt_causal": prompt_causal_mask(starts, 2 * L),  # diffusion SFT's default
    }
    return q, k, v, masks


def _flex_and_sdpa(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    block_mask = block_mask_from_dense(mask, q.shape[2], k.shape[2])

    def flex():
        return flex_attention_kernel(q, k, v, block_mask, enable_gqa=group > 1)

    def sdpa():
        expanded = (x.repeat_interleave(group, dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, *expanded, attn_mask=mask)

    return flex, sdpa


def flex_against_sdpa(ctx: Context, config: ModelConfig) -> None:
    """FlexAttention against SDPA with expanded heads on the block-diffusion and document masks: outputs and (CUDA:
    FlexAttention has no CPU backward) gradients, fwd+bwd ms."""
    if BlockMask is None:
        ctx.check("SKIP", "flex", "this torch has no FlexAttention")
        return
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # the CPU mode's eager one
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    q, k, v, masks = _attention_inputs(config, ctx.device, 256 if ctx.cuda else 16, dtype)
    for name, mask in masks.items():
        leaves = [x.detach().requires_grad_(ctx.cuda) for x in (q, k, v)]
        flex, sdpa = _flex_and_sdpa(*leaves, mask)
        outs = {"flex": flex(), "sdpa": sdpa()}
        diffs = {"out": relative_diff(outs["flex"], outs["sdpa"])}
        result = {"max_diff_over_max_abs": diffs}
        if ctx.cuda:
            cotangent = torch.randn_like(outs["flex"])
            grads = {key: torch.autograd.grad(out, leaves, cotangent) for key, out in outs.items()}
            diffs |= {f"d{n}": relative_diff(a, b) for n, a, b in zip("qkv", grads["flex"], grads["sdpa"])}
            for key, fn in (("flex", flex), ("sdpa", sdpa)):
                result[f"{key}_fwd_bwd_ms"] = timed_ms(lambda fn=fn: fn().backward(cotangent), ctx.device)
        tolerance = 2e-2 if ctx.cuda else 1e-5  # bf16 on CUDA: about 2 ** -8 relative per rounding
        worst = max(diffs.values())
        detail = ", ".join(f"{n} {x:.1e}" for n, x in diffs.items())
        if ctx.cuda:
            detail += f"; fwd+bwd flex {result['flex_fwd_bwd_ms']:.2f} ms, sdpa {result['sdpa_fwd_bwd_ms']:.2f} ms"
        ctx.verdict(f"flex_vs_sdpa.{name}", worst <= tolerance, f"max |diff| / max |sdpa| {detail}", **result)


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / max(float(b.detach().abs().max()), 1e-12)


def loss_variants(ctx: Context, config: ModelConfig) -> None:
    """The cross-entropy variants on one step's logits (seed shape on CUDA): value and gradient against an fp64
    reference, fwd+bwd ms. `compiled` is what runs inside a compiled training graph."""
    rows = 128 * 256 if ctx.cuda else 64
    g = torch.Generator(device=ctx.device).manual_seed(0)
    padded = torch.randn(rows, config.padded_vocab_size, device=ctx.device, generator=g) * 2
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    logits = padded.to(dtype)[:, : config.vocab_size]  # the model's vocabulary slice of its padded head
    targets = torch.randint(0, config.vocab_size, (rows,), device=ctx.device, generator=g)
    targets[::7] = IGNORE_INDEX  # unscored positions, as in every real batch
    variants = {
        "plain": lambda x: F.cross_entropy(x.float(), targets, ignore_index=IGNORE_INDEX, reduction="none"),
        "chunked": lambda x: chunked_cross_entropy(x, targets, IGNORE_INDEX),
    }
    if ctx.cuda:  # inductor on the CPU needs a C++ toolchain and half a minute: not in the CPU mode
        variants["compiled"] = torch.compile(variants["plain"], dynamic=False)
    ref_leaf = logits.double().detach().requires_grad_()
    reference = F.cross_entropy(ref_leaf, targets, ignore_index=IGNORE_INDEX, reduction="none")
    (ref_grad,) = torch.autograd.grad(reference.sum(), ref_leaf)
    results = {}
    for name, fn in variants.items():
        leaf = logits.detach().requires_grad_()
        value = fn(leaf)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
        ms = timed_ms(lambda fn=fn: fn(logits.detach().requires_grad_()).sum().backward(), ctx.device)
        r = results[name] = {"value_diff": max_diff(value, reference), "grad_diff": max_diff(grad, ref_grad)}
        r["fwd_bwd_ms"] = ms
        ok = r["value_diff"] <= 1e-3 and r["grad_diff"] <= (1e-2 if ctx.cuda else 1e-6)
        detail = f"value |diff| {r['value_diff']:.1e}, grad |diff| {r['grad_diff']:.1e}, fwd+bwd {ms:.2f} ms"
        ctx.verdict(f"cross_entropy.{name}", ok, detail, **r)
    if not ctx.cuda:
        ctx.check("SKIP", "cross_entropy.compiled", "CPU mode: inductor not run")
    ctx.report.stage_result("kernels", cross_entropy=results)
