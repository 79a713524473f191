"""What the SFT batches' layout saves in an SFT step: forward and backward of each route's SFT loss on the sample's
SFT batches, with the head at every position against the positions the batcher lists, and, for the diffusion SFT,
the EOS padding to the batch's longest row (LLaDA) against a fixed --eos-padding-length (the quickstart's 5).
Each pair is interleaved batch by batch so a noisy CPU slows both alike. The quickstart's model shape; the cost does
not depend on the weights, so fresh ones are used. Needs the sample (uv run python -m scripts.data.sample).

OMP_NUM_THREADS=1 uv run python -m benchmarks.sft_head_positions [--batches 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.config import ModelConfig
from model.objectives.ar_loss import next_token_loss
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.tokenizer import load_tokenizer, mask_token_id
from model.transformer import Transformer
from scripts.common.data.sft import SFTBatches, load_sft_examples
from scripts.common.pipeline import SMALL_MODEL

WARMUP_BATCHES = 4


def sft_step(model, route: str, batch: dict, listed: bool, mask_id: int) -> None:
    """One SFT loss, forward and backward, the head at the listed positions or everywhere."""
    at = batch["scored_at"] if listed else None
    if route == "ar":
        loss = next_token_loss(model, batch["input_ids"], batch["labels"], at)
    else:
        rng = torch.Generator().manual_seed(0)
        objective = DiffusionObjective(padding_weight=0.1)  # the diffusion SFT's default
        ids, maskable = batch["input_ids"], batch["maskable"]
        loss = diffusion_loss(model, ids, rng, mask_id, objective, maskable, scored_at=at, real=batch.get("real"))
    loss.backward()
    model.zero_grad(set_to_none=True)


def interleaved(name: str, steps: dict, batches: int) -> float:
    """Seconds of each of two step functions (called with the batch index, its batch already built) over the same
    batches, alternating which goes first; prints and returns how many times faster the second is."""
    order = list(steps.items())
    (slow, _), (fast, _) = order
    seconds = {slow: 0.0, fast: 0.0}
    for k in range(WARMUP_BATCHES + batches):
        for label, step in order if k % 2 else order[::-1]:
            start = time.perf_counter()
            step(k)
            if k >= WARMUP_BATCHES:
                seconds[label] += time.perf_counter() - start
    ratio = seconds[slow] / seconds[fast]
    print(f"{name}: {slow} {seconds[slow]:.2f} s, {fast} {seconds[fast]:.2f} s ({batches} batches each): ", end="")
    print(f"{ratio:.2f}x faster")
    return ratio


def built(batches: SFTBatches, count: int) -> list[dict]:
    return [batches.batch(k) for k in range(count)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dataset/sample_sft_train.jsonl")
    p.add_argument("--batches", type=int, default=20, help="timed batches per comparison, after 4 untimed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--eos-padding-length", type=int, default=5)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(".")
    examples = load_sft_examples(args.data, tokenizer, args.max_seq_len)
    mask_id = mask_token_id(tokenizer)
    results = {}
    for route in ("ar", "diffusion"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=len(tokenizer), logit_shift=route == "diffusion", **SMALL_MODEL))
        count = WARMUP_BATCHES + args.batches  # batches are built before timing: only the SFT step is timed
        longest = built(SFTBatches(examples, args.batch_size, seed=0, route=route), count)
        head = {
            "head at every position": lambda k: sft_step(model, route, longest[k], False, mask_id),
            "at the listed positions": lambda k: sft_step(model, route, longest[k], True, mask_id),
        }
        results[route] = interleaved(f"{route} SFT step", head, args.batches)
        if route == "diffusion":
            fixed = SFTBatches(examples, args.batch_size, seed=0, route=route, eos_padding=args.eos_padding_length)
            fixed = built(fixed, count)
            padding = {
                "EOS padding to the longest row": lambda k: sft_step(model, route, longest[k], True, mask_id),
                f"{args.eos_padding_length} EOS": lambda k: sft_step(model, route, fixed[k], True, mask_id),
            }
            results["diffusion_padding"] = interleaved(
                "diffusion SFT step, head at the listed positions", padding, args.batches
            )
    return results


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
