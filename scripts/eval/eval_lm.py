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
from pathlib import Path

from scripts.common.cli import parse, pick_device, run_main
from scripts.common.evaluation.lm_scores import LMScoring, add_lm_flags, add_paired_deltas, lm_results, lm_table
from scripts.common.settings import settings_from


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lm_flags(p)
    p.add_argument("--json-out", default=None, help="also write the numbers (with per-row values) to this json file")
    return parse(p, argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    scoring = settings_from(LMScoring, args)
    device = pick_device(args.device)
    scored = lm_results(args.checkpoint, args.tokenizer_dir, args.num_attention_heads, scoring, device)
    results = [result for result, _, _ in scored]
    add_paired_deltas(results)
    print(
        f"held-out {args.eval_data}: rows of {args.seq_len} tokens, each scored on tokens 1..{args.seq_len - 1} "
        "given token 0 (AR: exact NLL; diffusion: NELBO, an upper bound; s.e. across rows)"
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
