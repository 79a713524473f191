"""One checkpoint, two decoders: the AR-mode NLL and the diffusion bound of jointly trained checkpoints on the same
held-out rows (paired against an AR-only reference), and self-speculative decoding against AR with its KV cache.

uv run python -m scripts.eval.eval_joint --tokenizer-dir . --eval-data dataset/sample_reviews_val.jsonl \
    --seq-len 128 --reference weights/joint/ar_more_state_dict.pt \
    --checkpoint weights/joint/w0_state_dict.pt --checkpoint weights/joint/w03_state_dict.pt

Likelihoods (scripts/common/evaluation/lm_scores.py, as scripts.eval.eval_lm scores them): every checkpoint's exact
causal NLL per token (its AR mode; for a diffusion-only conversion, what its weights still do causally) and each
diffusion checkpoint's NELBO, with the same rows and mask draws for all; differences are paired over rows.
Speculation: --prompts prompts (the first --prompt-tokens tokens of held-out rows), each continued --new-tokens
tokens at batch 1 without stopping at EOS, by AR greedy decoding with its KV cache and by self-speculation with each
--draft-length (drafter: the block over the AR cache, the full canvas, or after the first round the verify
pass's own guesses, redraft off), alternating in one process; the speed is the ratio of their summed times (CPU
time on a CPU, so other jobs on a shared machine are not counted; wall time on an accelerator).
"""

from __future__ import annotations

import argparse
import time

import torch

from model.inference.ar import generate
from model.inference.speculative import DRAFT_CONTEXTS, SpeculativeConfig, speculative_generate
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import mask_token_id
from scripts.common.cli import pick_device, run_main
from scripts.common.device import synchronize
from scripts.common.evaluation.lm_scores import LMScoring, lm_eval_model, paired_delta
from scripts.common.evaluation.loading import HeldOutRows, load_checkpoint_for_eval
from scripts.common.settings import add_flags, settings_from


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="the AR-only checkpoint the AR-mode NLLs are paired against")
    p.add_argument("--checkpoint", action="append", required=True, help="diffusion checkpoint (repeat for several)")
    p.add_argument("--tokenizer-dir", default=".")
    # the held-out rows as eval_lm reads them (scored in float32)
    add_flags(
        p, LMScoring, skip=("dtype",), eval_data="dataset/sample_reviews_val.jsonl", seq_len=128, eval_max_batches=4
    )
    p.add_argument("--prompts", type=int, default=8, help="prompts for the speculation rows (0: none)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-length", type=int, action="append", default=None, help="k (repeatable; default 4 and 8)")
    p.add_argument(
        "--draft-context", action="append", choices=DRAFT_CONTEXTS, default=None, help="repeatable (default: both)"
    )
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def likelihoods(args, batches, device) -> list[dict]:
    """AR-mode NLL of the reference and every checkpoint, NELBO of every checkpoint, paired deltas."""
    rows = []
    for path in [args.reference, *args.checkpoint]:
        # A block-trained checkpoint is scored with the same whole-row draws as the others (one t for every block:
        # unbiased for its block NELBO), so the differences stay paired draw for draw; eval_lm scores it by block.
        model, tokenizer, checkpoint = load_checkpoint_for_eval(path, args.tokenizer_dir, None, device)
        kind = checkpoint.kind
        block_size = trained_block_size(checkpoint.extra) if kind == "diffusion" else None
        score = dict(batches=batches, mask_id=mask_token_id(tokenizer), mc_samples=args.mc_samples, seed=args.seed)
        ar = lm_eval_model(model, "ar", device=device, dtype="float32", **score)
        bound = None if kind == "ar" else lm_eval_model(model, kind, device=device, dtype="float32", **score)
        rows.append({"checkpoint": path, "ar": ar, "diffusion": bound, "block_size": block_size})
    first_diffusion = next((r["diffusion"] for r in rows if r["diffusion"] is not None), None)
    for row in rows:
        row["ar_delta"] = paired_delta(row["ar"], rows[0]["ar"])
        row["diffusion_delta"] = paired_delta(row["diffusion"], first_diffusion) if row["diffusion"] else None
    return rows


def print_likelihoods(rows: list[dict]) -> None:
    scored, draws = rows[0]["ar"], max((r["diffusion"] or {}).get("mc_samples", 0) for r in rows)
    print(f"{scored['rows']} held-out rows, {scored['tokens']:,} scored tokens; NELBO: {draws} mask draws per row")
    print("| checkpoint | AR-mode NLL (s.e.) | Δ vs reference (paired s.e.) | diffusion NELBO (s.e.) | Δ vs first |")
    print("|---|---:|---:|---:|---:|")
    delta = "{:+.4f} ± {:.4f}".format
    for r in rows:
        ar, d = r["ar"], r["diffusion"]
        bound = "—" if d is None else f"{d['nll_per_token']:.4f} ± {d['stderr']:.4f}"
        bound_delta = "—" if d is None else delta(*r["diffusion_delta"])
        ar_cells = f"{ar['nll_per_token']:.4f} ± {ar['stderr']:.4f} | {delta(*r['ar_delta'])}"
        print(f"| {r['checkpoint']} | {ar_cells} | {bound} | {bound_delta} |")


def speculation(args, path, prompts, device) -> list[dict]:
    """Per draft length: accepted drafts per verify, tokens per forward, AR time / speculative time, identity."""
    model, tokenizer, _ = load_checkpoint_for_eval(path, args.tokenizer_dir, "diffusion", device)
    mask_id, rows = mask_token_id(tokenizer), []
    now = time.process_time if device.type == "cpu" else time.perf_counter  # CPU time: other jobs' work not counted
    contexts = [(c, True) for c in args.draft_context or DRAFT_CONTEXTS] + [("cache", False)]
    for k, (context, redraft) in [(k, c) for k in args.draft_length or [4, 8] for c in contexts]:
        config = SpeculativeConfig(k, redraft=redraft, draft_context=context)
        ar_seconds = spec_seconds = 0.0
        accepted, forwards, tokens, identical = [], 0, 0, True
        for prompt in prompts:
            start = now()
            expected = list(generate(model, prompt, args.new_tokens))
            synchronize(device)
            middle = now()
            out = speculative_generate(model, [prompt], args.new_tokens, mask_id, config)
            synchronize(device)
            ar_seconds, spec_seconds = ar_seconds + middle - start, spec_seconds + now() - middle
            identical &= out.tokens == [expected]
            accepted += out.accepted
            forwards, tokens = forwards + out.forwards, tokens + len(out.tokens[0])
        rows.append(
            {
                "checkpoint": path,
                "draft_length": k,
                "drafter": context if redraft else "verify pass",
                "accepted_per_verify": sum(accepted) / len(accepted),
                "tokens_per_forward": tokens / forwards,
                "speed_vs_ar": ar_seconds / spec_seconds,
                "identical": identical,
            }
        )
    return rows


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)
    _, tokenizer = load_checkpoint_for_eval(args.reference, args.tokenizer_dir, None, device)[:2]
    batches = settings_from(HeldOutRows, args).batches(tokenizer)
    rows = likelihoods(args, batches, device)
    print_likelihoods(rows)
    prompts = [row[: args.prompt_tokens].tolist() for row in torch.cat(batches)[: args.prompts]]
    spec = [row for path in args.checkpoint for row in speculation(args, path, prompts, device)] if prompts else []
    if spec:
        print(f"\nself-speculation: {len(prompts)} prompts x {args.new_tokens} new tokens, batch 1, {device}")
        print(
            "| checkpoint | k | drafter sees | accepted / verify | tokens / forward | speed vs AR + cache | identical |"
        )
        print("|---|---:|---|---:|---:|---:|---|")
        for r in spec:
            print(
                f"| {r['checkpoint']} | {r['draft_length']} | {r['drafter']} | {r['accepted_per_verify']:.2f} | "
                f"{r['tokens_per_forward']:.2f} | {r['speed_vs_ar']:.2f}x | {r['identical']} |"
            )
    return {"likelihoods": rows, "speculation": spec}


if __name__ == "__main__":
    run_main(main)
