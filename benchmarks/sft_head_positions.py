"""What running the head only at the scored positions saves in an SFT step: forward and backward of each route's
SFT loss on the sample's SFT batches, with the head at every position and at the positions the batcher lists,
interleaved batch by batch so a noisy CPU slows both alike. The quickstart's model shape; the cost does not depend
on the weights, so fresh ones are used. Needs the sample (uv run python -m scripts.data.sample).

OMP_NUM_THREADS=1 uv run python -m benchmarks.sft_head_positions [--batches 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from model.ar import next_token_loss
from model.config import ModelConfig
from model.diffusion_loss import DiffusionObjective, diffusion_loss
from model.tokenizer import load_tokenizer, mask_token_id
from model.transformer import Transformer
from scripts.common.pipeline import SMALL_MODEL
from scripts.common.sft import SFTBatches, load_sft_examples

WARMUP_BATCHES = 4


def sft_step(model, route: str, batch: dict, listed: bool, mask_id: int) -> None:
    """One SFT loss, forward and backward, the head at the listed positions or everywhere."""
    at = batch["scored_at"] if listed else None
    if route == "ar":
        loss = next_token_loss(model, batch["input_ids"], batch["labels"], at)
    else:
        rng = torch.Generator().manual_seed(0)
        objective = DiffusionObjective(padding_weight=0.1)  # the diffusion SFT's default
        loss = diffusion_loss(model, batch["input_ids"], rng, mask_id, objective, batch["maskable"], scored_at=at)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dataset/sample_sft_train.jsonl")
    p.add_argument("--batches", type=int, default=20, help="timed batches per route, after 4 untimed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(".")
    examples = load_sft_examples(args.data, tokenizer, args.max_seq_len)
    results = {}
    for route in ("ar", "diffusion"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=len(tokenizer), logit_shift=route == "diffusion", **SMALL_MODEL))
        batches = SFTBatches(examples, args.batch_size, seed=0, route=route)
        seconds = {False: 0.0, True: 0.0}
        for k in range(WARMUP_BATCHES + args.batches):
            batch = batches.batch(k)
            for listed in (False, True) if k % 2 else (True, False):  # alternate which goes first
                start = time.perf_counter()
                sft_step(model, route, batch, listed, mask_token_id(tokenizer))
                if k >= WARMUP_BATCHES:
                    seconds[listed] += time.perf_counter() - start
        results[route] = seconds[False] / seconds[True]
        print(
            f"{route} SFT step: head at every position {seconds[False]:.2f} s, at the listed positions "
            f"{seconds[True]:.2f} s ({args.batches} batches each): {results[route]:.2f}x faster"
        )
    return results


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
