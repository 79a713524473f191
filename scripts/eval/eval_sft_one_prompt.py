"""One prompt (or a file of prompts) through an AR SFT model, a diffusion SFT model, or both side by side,
with a fair speed report: AR decodes with its KV cache, counts are generated token ids.

uv run python -m scripts.eval.eval_sft_one_prompt --prompt "你好，请介绍你自己。" --tokenizer-dir . \
    --minimind-checkpoint weights/minimind_sft_state_dict.pt \
    --diffusion-checkpoint weights/diffusion_sft_state_dict.pt --seq-len 512 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig
from model.inference.sampling import DiffusionSamplerConfig
from model.tokenizer import prompt_ids
from scripts.common.cli import flag_names, output_file, parse, pick_device, run_main
from scripts.common.data.packing import chunks
from scripts.common.data.readers import check_data_file, iter_jsonl, write_jsonl
from scripts.common.evaluation.generation import ar_answers, default_block_size, diffusion_answers
from scripts.common.evaluation.loading import SFTCheckpoints, load_checkpoint_for_eval
from scripts.common.evaluation.sampler_flags import SamplerFlags, checked_sampler, generation_length
from scripts.common.settings import add_flags, flag, settings_from


@dataclass
class Prompts:
    """What eval_sft_one_prompt asks, and how the AR model answers (the diffusion one: SamplerFlags)."""

    prompt: str | None = flag(None, "the user message")
    prompt_file: str | None = flag(None, 'many prompts: .txt (one per line) or .jsonl ({"prompt": ...}); writes --out')
    out: str | None = flag(None, "jsonl of answers and speed for --prompt-file (default: <prompt-file>.answers.jsonl)")
    batch_size: int = flag(
        1, "--prompt-file: prompts decoded together (left-padded); an answer's time is its batch's", low=1
    )
    no_chat_wrap: bool = flag(False, "feed the prompt as raw text instead of the chat template")
    seq_len: int = flag(512, "diffusion canvas limit: prompt + generation", low=2)
    max_new_tokens: int = flag(128, "tokens to generate", low=1)
    ar_temperature: float = flag(0.0, "0 = greedy", low=0)
    ar_top_k: int = flag(0, "0 = off", low=0)
    ar_top_p: float = flag(1.0, "nucleus sampling's probability mass", low=0, high=1, above_low=True)
    seed: int = flag(0, "seeds the sampling")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, Prompts)
    add_flags(p, SFTCheckpoints)
    add_flags(p, SamplerFlags)
    return parse(p, argv)


def read_prompts(path: str) -> list[str]:
    how = 'write one prompt a line (.txt) or {"prompt": ...} a line (.jsonl)'
    p = check_data_file(path, fix=how)
    if p.suffix == ".txt":
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = []
        for lineno, obj in iter_jsonl(p):
            if not isinstance(obj.get("prompt"), str):
                raise NanoLladaError(f"{p}:{lineno}: needs a string field 'prompt'")
            prompts.append(obj["prompt"])
    if not prompts:
        raise NanoLladaError(f"--prompt-file {p}: no prompts in it; {how}")
    return prompts


def report(name: str, answer) -> None:
    s = answer.stats()
    print(f"=== {name} Output ===\n{answer.text}")
    first = "time to first token" if name == "AR" else "time to first round"
    print(
        f"--- {name} speed: {s['new_tokens']} tokens in {s['seconds']:.3f} s = {s['tokens_per_s']:.1f} tokens/s; "
        f"{first} {s['first_seconds'] * 1000:.1f} ms; {s['forward_passes']} forward passes "
        f"({s['tokens_per_forward']:.2f} tokens/forward)"
    )


def answer_batch(name: str, loaded, args, prompts: list[str], device) -> tuple[list, DiffusionSamplerConfig | None]:
    """One model's answers to a batch of prompts, and the diffusion settings they were decoded with (one canvas for
    a diffusion batch: its longest prompt sets the room left for the answers)."""
    model, tokenizer, checkpoint = loaded
    ids = [prompt_ids(tokenizer, prompt, chat=not args.no_chat_wrap) for prompt in prompts]
    if name == "AR":
        drawn = ARSamplerConfig(args.ar_temperature, args.ar_top_k, args.ar_top_p)
        answers = ar_answers(model, tokenizer, ids, args.max_new_tokens, device, drawn, args.seed, args.dtype, len(ids))
        return answers, None
    gen_length = generation_length(max(map(len, ids)), args.seq_len, args.max_new_tokens)
    flags = settings_from(SamplerFlags, args)
    asked = flags.asked(gen_length, block_size=flags.block_size or default_block_size(gen_length))
    sampler = checked_sampler(asked, checkpoint)
    with flag_names():
        return diffusion_answers(model, tokenizer, ids, sampler, device, args.seed, args.dtype, len(ids)), sampler


def summarize(rows: list[dict], names, args) -> None:
    """Write the answers of --prompt-file and print each model's total speed (a batch's time counted once)."""
    out = Path(args.out or f"{args.prompt_file}.answers.jsonl")
    write_jsonl(out, rows)
    for name in names:
        stats = [r[name.lower()] for r in rows]
        tokens = sum(s["new_tokens"] for s in stats)
        seconds = sum(s["seconds"] / s["batch"] for s in stats)
        print(
            f"{name}: {len(stats)} prompts, {tokens} tokens in {seconds:.2f} s "
            f"= {tokens / max(seconds, 1e-9):.1f} tokens/s"
        )
    print(f"wrote {out}")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    routes = settings_from(SFTCheckpoints, args).routes()
    if (args.prompt is None) == (args.prompt_file is None):
        raise NanoLladaError("give exactly one of --prompt and --prompt-file")
    if args.prompt_file:  # checked before any model decodes: the answers are written only at the end
        output_file(args.out or f"{args.prompt_file}.answers.jsonl", "--out")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    device = pick_device(args.device)
    models = {name: load_checkpoint_for_eval(path, args.tokenizer_dir, kind, device) for name, path, kind in routes}
    quiet = len(prompts) > 1
    rows, noted = [], False
    for chunk in chunks(prompts, args.batch_size):
        answers = {}
        for name, loaded in models.items():
            answers[name], sampler = answer_batch(name, loaded, args, chunk, device)
            if sampler is not None and sampler.block_causal and not noted:
                noted = True
                print(
                    f"block-trained diffusion checkpoint: decoding block-causally with block size {sampler.block_size} "
                    f"(--block-length and --cache do not apply)"
                )
        for i, prompt in enumerate(chunk):
            row = {"prompt": prompt}
            for name in models:
                if not quiet:
                    report(name, answers[name][i])
                row[name.lower()] = {"text": answers[name][i].text, **answers[name][i].stats()}
            rows.append(row)
        if quiet:
            print(f"[{len(rows)}/{len(prompts)}] {chunk[-1][:40]}")
    if args.prompt_file:
        summarize(rows, models, args)
    return rows


if __name__ == "__main__":
    run_main(main)
