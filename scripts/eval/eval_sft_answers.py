"""Long SFT answers scored on a held-out file (the offline sample's news continuation, or any SFT jsonl whose last
assistant turn is the gold answer), for checkpoints of either route on the same questions:

- the gold answer's NLL per token after its prompt (answer + <|im_end|>): AR exact, diffusion the exact-count
  bound (LLaDA Algorithm 3, --mc-samples draws; per block for a block-trained checkpoint), so lower is better and
  the diffusion figure is an upper bound;
- with --judge AR_CHECKPOINT, each model's own greedy answers decoded and scored by that fixed AR model: their
  generative perplexity (lower: more fluent under the judge), mean length and how many came out empty.

uv run python -m scripts.eval.eval_sft_answers --tokenizer-dir . --data dataset/sample_continuation_test.jsonl \
    --checkpoint weights/quick_ar_sft_state_dict.pt --checkpoint weights/quick_diffusion_sft_state_dict.pt \
    --judge weights/quick_ar_state_dict.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint
from model.objectives.block_curriculum import trained_block_size
from scripts.common.bench.quality import generative_nll
from scripts.common.cli import Bounded, flag_names, output_file, parse, pick_device, run_main
from scripts.common.evaluation.answers import answer_nll, sft_questions
from scripts.common.evaluation.generation import ar_answers, default_block_size, diffusion_answers
from scripts.common.evaluation.loading import Device, add_checkpoint_flags, load_checkpoint_for_eval
from scripts.common.settings import add_flags


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "an SFT checkpoint of either route (repeat for several)", several=True)
    p.add_argument("--data", required=True, help="SFT jsonl; the last assistant turn of each row is the gold answer")
    p.add_argument("--limit", type=int, action=Bounded, low=1, default=None, help="only the first N questions")
    p.add_argument("--mc-samples", type=int, action=Bounded, low=1, default=16, help="diffusion: mask draws per answer")
    p.add_argument("--judge", default=None, help="an AR checkpoint that scores each model's decoded answers")
    p.add_argument("--max-new-tokens", type=int, action=Bounded, low=1, default=96, help="decoded answer length")
    p.add_argument("--batch-size", type=int, action=Bounded, low=1, default=16, help="answers decoded together")
    add_flags(p, Device)
    p.add_argument("--json-out", default=None, help="also write the figures (with per-answer NLLs) here")
    return parse(p, argv)


def decoded(model, tokenizer, checkpoint, prompts: list[list[int]], args, device) -> list[list[int]]:
    """Greedy answers (ids before EOS): AR with its KV cache; diffusion one token per step in blocks of 32 (or as
    the checkpoint was trained to decode)."""
    n, batching = args.max_new_tokens, dict(dtype=args.dtype, batch_size=args.batch_size)
    if checkpoint.kind == "ar":
        answers = ar_answers(model, tokenizer, prompts, n, device, **batching)
    else:
        asked = DiffusionSamplerConfig(gen_length=n, steps=n, block_size=default_block_size(n))
        with flag_names():
            sampler = sampler_for_checkpoint(checkpoint, asked)
        answers = diffusion_answers(model, tokenizer, prompts, sampler, device, **batching)
    return [answer.ids for answer in answers]


def summary_line(result: dict) -> str:
    bound = " (upper bound)" if result["kind"] == "diffusion" else ""
    line = (
        f"{result['kind']}: answer NLL {result['nll_per_token']:.4f} nats/token{bound} over {result['answers']} "
        f"answers, {result['tokens']} tokens"
    )
    if "generative_nll_per_token" in result:
        judged = result["generative_nll_per_token"]
        line += (
            f"; decoded: judge NLL {'-' if judged is None else f'{judged:.4f}'} nats/token, "
            f"{result['mean_answer_tokens']:.1f} tokens, {result['empty_answers']} empty"
        )
    return f"{line}  [{result['checkpoint']}]"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.json_out:
        output_file(args.json_out, "--json-out")
    device = pick_device(args.device)
    judge = load_checkpoint_for_eval(args.judge, args.tokenizer_dir, "ar", device)[0] if args.judge else None
    results, items = [], None
    for path in args.checkpoint:
        model, tokenizer, checkpoint = load_checkpoint_for_eval(path, args.tokenizer_dir, None, device)
        if items is None:  # one --tokenizer-dir for all: every checkpoint answers these very questions
            items = sft_questions(args.data, tokenizer, args.limit)
        block_size = trained_block_size(checkpoint.extra) if checkpoint.kind == "diffusion" else None
        result = {"checkpoint": str(path), "kind": checkpoint.kind}
        result |= answer_nll(model, tokenizer, checkpoint.kind, items, args.mc_samples, block_size)
        if judge is not None:
            prompts = [prompt for prompt, _ in items]
            outputs = decoded(model, tokenizer, checkpoint, prompts, args, device)
            total, count = generative_nll(judge, prompts, outputs)
            result |= {
                "generative_nll_per_token": total / count if count else None,
                "mean_answer_tokens": count / len(outputs),
                "empty_answers": sum(not ids for ids in outputs),
            }
        results.append(result)
        print(summary_line(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"data": args.data, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    run_main(main)
