"""Held-out language modelling for both routes on the SAME rows: AR NLL (perplexity) vs diffusion NELBO.

uv run python -m scripts.eval.eval_lm --eval-data dataset/sample_pretrain_val.jsonl --tokenizer-dir . \
    --checkpoint weights/pretrain_ar.pt --checkpoint weights/diffusion_from_ar_best.pt [--json-out lm.json]

What is scored. The held-out file is packed into rows of --seq-len tokens exactly as in training (the first
--eval-batch-size x --eval-max-batches rows, the same every time). In every row, both routes score the same
tokens, positions 1..L-1 (never PAD), given the row's first token, in nats per token:
- AR: the exact -log p(x_j | x_<j), summed; exp of the mean is the perplexity.
- diffusion: the NELBO, an upper bound on -log p(x_1..x_L-1 | x_0), position 0 never masked (it is the
  context). Estimated in LLaDA's low-variance form (Eq. 14 / Algorithm 3): each of --mc-samples draws masks
  exactly l of the n scored tokens and weighs their CE by n / l, with l stratified over 1..n across the draws.
  Same expectation as the training loss's Eq. 3 (Bernoulli(t) masks weighted 1/t), whose noise at small t is
  what makes few-draw estimates jumpy. exp of it bounds the perplexity from above.
So AR NLL and diffusion NELBO measure the same quantity, the diffusion one only from above.

Standard errors (s.e.). Rows are the sampling unit: a row's number is its summed NLL (AR) or its mean over
mask draws of the summed NELBO terms (diffusion), and the per-token mean is the ratio sum / tokens. Its s.e.
is the delta-method s.e. of that ratio across rows (= std of row means / sqrt(rows) when rows are equally
long). For diffusion this one number holds both the spread between rows and the mask noise, so the two
routes' s.e. answer the same question: how much the number would move on other held-out rows (and masks).
"MC s.e." is the mask-noise part alone (rows held fixed), computed as if the draws were i.i.d., which
overstates it under stratification; raise --mc-samples to shrink it. (The total s.e. stays valid: each row's
draws are independent of every other row's.) Because every
checkpoint sees the same rows (and diffusion checkpoints the same mask draws, from --seed), a difference
between checkpoints is measured per row: the Δ column is each checkpoint minus the first, with the paired s.e.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from model.block_diffusion import trained_block_size
from model.diffusion import pretraining_maskable
from model.errors import NanoLladaError
from model.likelihood import ar_nll_rows, diffusion_nelbo_rows
from model.tokenizer import mask_token_id
from scripts.common.cli import pick_device, positive, run_main
from scripts.common.evaluation import held_out_batches, load_checkpoint_for_eval
from scripts.common.trainer import autocast


def add_lm_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared with scripts.eval.compare."""
    p.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="AR or diffusion checkpoint (.pt, full, _best or _state_dict, or a MiniMind2 .pth); repeat for several",
    )
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument(
        "--num-attention-heads",
        type=int,
        default=None,
        help="only for MiniMind2 .pth files, which do not store it (default 8)",
    )
    p.add_argument(
        "--eval-data",
        default="dataset/sample_pretrain_val.jsonl",
        help="held-out jsonl/txt (default: the embedded sample's validation split, from scripts.data.sample)",
    )
    p.add_argument("--jsonl-field", default="text")
    p.add_argument(
        "--seq-len", "--max-seq-len", dest="seq_len", type=int, default=256, help="row length (use the trained one)"
    )
    p.add_argument("--eval-batch-size", type=int, default=16, help="rows per forward")
    p.add_argument(
        "--eval-max-batches", type=int, default=8, help="rows scored = batch size x this (fewer if the file is short)"
    )
    p.add_argument("--mc-samples", type=int, default=8, help="mask draws per row for diffusion checkpoints")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="autocast dtype on CUDA (CPU runs float32)"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--seed", type=int, default=2026, help="seeds the diffusion mask draws (the same for every checkpoint)"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lm_flags(p)
    p.add_argument("--json-out", default=None, help="also write the numbers (with per-row values) to this json file")
    return p.parse_args(argv)


def load_any_kind(path, tokenizer_dir, device, num_attention_heads=None):
    """(model, tokenizer, kind) for a checkpoint of either kind, with load_for_eval's tokenizer checks."""
    model, tokenizer, checkpoint = load_checkpoint_for_eval(path, tokenizer_dir, None, device, num_attention_heads)
    block = trained_block_size(checkpoint.extra) if checkpoint.kind == "diffusion" else None
    if block:
        print(
            f"note: {path} was trained with block diffusion (block {block}); its NELBO here is "
            f"the bidirectional (MDLM) bound, which is not the objective it was trained on"
        )
    return model, tokenizer, checkpoint.kind


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
    model, kind: str, batches: list, mask_id: int, mc_samples: int, seed: int, device, dtype: str
) -> dict:
    """Per-token NLL (AR) or NELBO (diffusion) over the batches, with s.e. across rows and the mask-noise s.e."""
    generator = torch.Generator(device=device).manual_seed(seed)
    sums, tokens, mc_variances = [], [], []
    for batch in batches:
        batch = batch.to(device)
        scored = scored_positions(batch)
        with autocast(device, dtype):
            if kind == "ar":
                sums.append(ar_nll_rows(model, batch, scored).cpu())
            else:
                terms = diffusion_nelbo_rows(model, batch, scored, mask_id, mc_samples, generator).cpu()  # [S, B]
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


def add_paired_deltas(results: list[dict]) -> None:
    """Each result gains delta / delta_stderr: its per-token number minus the first one's, paired over rows."""
    base = results[0]
    for result in results:
        if result["row_tokens"] != base["row_tokens"]:
            raise NanoLladaError(
                f"{result['checkpoint']}: scored other rows than {base['checkpoint']}; compare with the same --eval-data and --seq-len"
            )
        difference = torch.tensor(result["row_sums"]) - torch.tensor(base["row_sums"])
        result["delta"], result["delta_stderr"] = ratio_mean_and_stderr(difference, torch.tensor(result["row_tokens"]))


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


def check_lm_args(args) -> None:
    for name in ("seq_len", "eval_batch_size", "eval_max_batches", "mc_samples"):
        positive("--" + name.replace("_", "-"), getattr(args, name))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    check_lm_args(args)
    device = pick_device(args.device)
    results, batches = [], None
    for path in args.checkpoint:
        model, tokenizer, kind = load_any_kind(path, args.tokenizer_dir, device, args.num_attention_heads)
        if batches is None:  # one tokenizer dir for all, so every checkpoint gets these very rows
            batches = held_out_batches(
                args.eval_data, tokenizer, args.jsonl_field, args.seq_len, args.eval_batch_size, args.eval_max_batches
            )
        result = lm_eval_model(
            model, kind, batches, mask_token_id(tokenizer), args.mc_samples, args.seed, device, args.dtype
        )
        results.append({"checkpoint": str(path), **result})
        del model
    add_paired_deltas(results)
    print(
        f"held-out {args.eval_data}: rows of {args.seq_len} tokens, each scored on tokens 1..{args.seq_len - 1} given token 0 "
        f"(AR: exact NLL; diffusion: NELBO, an upper bound; s.e. across rows)"
    )
    print(lm_table(results))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(
            json.dumps({"eval_data": args.eval_data, "seq_len": args.seq_len, "results": results}, indent=1)
        )
    return results


if __name__ == "__main__":
    run_main(main)
