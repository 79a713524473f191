"""Held-out language modelling for both routes on the SAME rows (scripts.eval.eval_lm, scripts.eval.compare):
AR NLL vs diffusion NELBO per token, their standard errors across rows, and paired differences between
checkpoints. The eval_lm docstring says what is scored and why."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.errors import NanoLladaError
from model.inference.likelihood import ar_nll_rows, diffusion_nelbo_rows
from model.objectives.masking import pretraining_maskable
from model.tokenizer import mask_token_id
from scripts.common.device import autocast
from scripts.common.evaluation.loading import HeldOutRows, add_checkpoint_flags, load_any_kind
from scripts.common.settings import add_flags, flag


@dataclass
class LMScoring(HeldOutRows):
    """The held-out rows every checkpoint is scored on, and how (scripts.eval.eval_lm, scripts.eval.compare)."""

    eval_data: str = flag(
        "dataset/sample_pretrain_val.jsonl",
        "held-out jsonl/txt (default: the embedded sample's validation split, from scripts.data.sample)",
    )
    mc_samples: int = flag(8, "mask draws per row for diffusion checkpoints", low=1)
    dtype: str = flag("bfloat16", "autocast dtype on CUDA (CPU runs float32)", choices=["bfloat16", "float32"])
    seed: int = flag(2026, "seeds the diffusion mask draws (the same for every checkpoint)")


def add_lm_flags(p: argparse.ArgumentParser) -> None:
    """The flags of scripts.eval.eval_lm, shared with scripts.eval.compare."""
    add_checkpoint_flags(
        p,
        "AR or diffusion checkpoint (.pt, full, _best or _state_dict, or a MiniMind2 .pth); repeat for several",
        several=True,
    )
    add_flags(p, LMScoring)
    p.add_argument("--device", default=None)


def scored_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """The tokens both routes score: every non-PAD token after the row's first, which is the context."""
    scored = pretraining_maskable(input_ids).clone()
    scored[:, 0] = False
    return scored


def ratio_mean_and_stderr(row_sums: torch.Tensor, row_tokens: torch.Tensor) -> tuple[float, float]:
    """Per-token mean sum(row_sums) / sum(row_tokens) and its delta-method standard error across rows."""
    row_sums, row_tokens = row_sums.double(), row_tokens.double()
    mean = (row_sums.sum() / row_tokens.sum()).item()
    rows = len(row_sums)
    if rows < 2:
        return mean, float("nan")
    residual = row_sums - mean * row_tokens
    return mean, math.sqrt(rows / (rows - 1) * (residual**2).sum().item()) / row_tokens.sum().item()


@torch.no_grad()
def lm_eval_model(
    model, kind: str, batches: list, mask_id: int, mc_samples: int, seed: int, device, dtype: str, block_size=None
) -> dict:
    """Per-token NLL (AR) or NELBO (diffusion; the block NELBO of a block-trained model) over the batches, with s.e.
    across rows and the mask-noise s.e."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sums, tokens, mc_variances = [], [], []
    for batch in batches:
        batch = batch.to(device)
        scored = scored_positions(batch)
        with autocast(device, dtype):
            if kind == "ar":
                sums.append(ar_nll_rows(model, batch, scored).cpu())
            else:
                terms = diffusion_nelbo_rows(model, batch, scored, mask_id, mc_samples, generator, block_size).cpu()
                sums.append(terms.mean(0))
                mc_variances.append(
                    terms.var(0) / mc_samples if mc_samples > 1 else torch.full_like(terms[0], float("nan"))
                )
        tokens.append(scored.sum(1).cpu())
    row_sums, row_tokens = torch.cat(sums), torch.cat(tokens)
    mean, stderr = ratio_mean_and_stderr(row_sums, row_tokens)
    mc_stderr = 0.0 if kind == "ar" else math.sqrt(torch.cat(mc_variances).sum().item()) / row_tokens.sum().item()
    return {
        "kind": kind,
        "block_size": block_size,
        "rows": len(row_sums),
        "tokens": int(row_tokens.sum()),
        "nll_per_token": mean,
        "stderr": stderr,
        "mc_stderr": mc_stderr,
        "mc_samples": mc_samples if kind == "diffusion" else 0,
        "perplexity": math.exp(min(mean, 700.0)),
        "row_sums": row_sums.tolist(),
        "row_tokens": row_tokens.tolist(),
    }


def paired_delta(result: dict, base: dict) -> tuple[float, float]:
    """`result`'s per-token number minus `base`'s (lm_eval_model results on the same rows), and its paired s.e."""
    difference = torch.tensor(result["row_sums"]) - torch.tensor(base["row_sums"])
    return ratio_mean_and_stderr(difference, torch.tensor(result["row_tokens"]))


def add_paired_deltas(results: list[dict]) -> None:
    """Each result gains delta / delta_stderr: its per-token number minus the first one's, paired over rows."""
    base = results[0]
    for result in results:
        if result["row_tokens"] != base["row_tokens"]:
            raise NanoLladaError(
                f"{result['checkpoint']}: scored other rows than {base['checkpoint']}; compare with the same "
                "--eval-data and --seq-len"
            )
        result["delta"], result["delta_stderr"] = paired_delta(result, base)


def lm_table(results: list[dict]) -> str:
    """Markdown table of lm_eval_model results (after add_paired_deltas)."""
    lines = [
        "| checkpoint | kind | rows | tokens | nats/token | s.e. | MC s.e. | perplexity | Δ vs first (paired s.e.) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        measure = "NLL" if r["kind"] == "ar" else f"NELBO ({r['mc_samples']} draws)"
        ppl = f"{r['perplexity']:.2f}" if r["kind"] == "ar" else f"≤ {r['perplexity']:.2f}"
        mc = "exact" if r["kind"] == "ar" else f"{r['mc_stderr']:.4f}"
        delta = "—" if r is results[0] else f"{r['delta']:+.4f} ± {r['delta_stderr']:.4f}"
        lines.append(
            f"| {r['checkpoint']} | {r['kind']} | {r['rows']} | {r['tokens']:,} | {r['nll_per_token']:.4f} {measure} | "
            f"{r['stderr']:.4f} | {mc} | {ppl} | {delta} |"
        )
    return "\n".join(lines)


def lm_results(
    checkpoints: list, tokenizer_dir: str, heads: int | None, scoring: LMScoring, device
) -> Iterator[tuple[dict, object, object]]:
    """(result, model, tokenizer) for each checkpoint in turn, all scored on the same held-out rows (`heads`: for
    MiniMind2 .pth files)."""
    batches, s = None, scoring
    for path in checkpoints:
        model, tokenizer, kind, block_size = load_any_kind(path, tokenizer_dir, device, heads)
        if batches is None:  # one tokenizer dir for all, so every checkpoint gets these very rows
            batches = s.batches(tokenizer)
        mask_id = mask_token_id(tokenizer)
        result = lm_eval_model(model, kind, batches, mask_id, s.mc_samples, s.seed, device, s.dtype, block_size)
        yield {"checkpoint": str(path), **result}, model, tokenizer
        del model  # before the next one loads
