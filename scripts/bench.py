"""Speed benchmark: the speed card (diffusion decoding against AR decoding of the same model size, both trained, in
content tokens/s with quality beside it) and training throughput of both routes.

    python -m scripts.bench --checkpoint AR.pt --checkpoint DIFF.pt \
        [--sft-checkpoint AR_SFT.pt --sft-checkpoint DIFF_SFT.pt]
    python -m scripts.bench --models weights/report   # the report's models, by their names in that folder
    python -m scripts.bench --tiny                    # CI smoke run: random tiny models, labelled, never a figure

The card (scripts/common/bench/card.py): continuation of held-out texts at 32, 128 and 256 new tokens (the pair) and
the review-sentiment answers (the SFT pair), at batch 1 and 16, for AR with its KV cache and every diffusion mode;
content tokens/s (tokens before EOS), time to first token / block, forward passes, tokens per forward, generative
perplexity under the pair's AR model, unigram entropy, accuracy. Training (scripts/common/bench/training.py) runs on
CUDA (MiniMind2-Small shape) and in --tiny; `--skip-training` leaves it out. Writes JSON, a markdown card (printed)
and a plot of quality against speed to benchmarks/results/. Benchmarks print numbers; they assert nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch

from model.checkpoint import build_model, read_checkpoint
from model.config import preset, shape_difference
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import BOS_ID, load_tokenizer, mask_token_id
from model.transformer import Transformer
from scripts.common.bench.card import (
    TINY_CARD,
    CardSettings,
    Pair,
    Workload,
    continuation_prompts,
    measure_card,
)
from scripts.common.bench.report import ROOT, git_commit, markdown, plot_card
from scripts.common.bench.training import TINY, BenchSettings, bench_training, training_flops_per_token
from scripts.common.cli import Bounded, pick_device, run_main

__all__ = ["main", "training_flops_per_token"]

# The report's models (scripts.report_experiments --part conversion, into weights/report/): the AR model, its
# default conversion (logit shift, bidirectional), and their SFT versions on the review-sentiment task.
REPORT_MODELS = {
    "checkpoint": ("ar_state_dict.pt", "a2d_shift_state_dict.pt"),
    "sft_checkpoint": ("ar_sft_state_dict.pt", "sft_a2d_shift_state_dict.pt"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="smoke run for CI: random tiny models, never a speed figure")
    p.add_argument("--out", default=None, help="JSON path; default benchmarks/results/<card|smoke>_<device>_<date>")
    p.add_argument("--checkpoint", action="append", default=[], help="the pair: an AR and a diffusion checkpoint")
    p.add_argument("--sft-checkpoint", action="append", default=[], help="the SFT pair (classification workload)")
    p.add_argument("--ar-checkpoint", default=None, help="the AR checkpoint of the pair (same as another --checkpoint)")
    p.add_argument("--models", default=None, help="a folder with the report's four models (names: REPORT_MODELS)")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--continuation-data", default="dataset/sample_pretrain_val.jsonl")
    p.add_argument("--classification-data", default="dataset/sample_sft_test.jsonl")
    p.add_argument("--prompts", type=int, action=Bounded, low=1, default=None, help="continuation prompts (default 16)")
    p.add_argument(
        "--questions", type=int, action=Bounded, low=1, default=None, help="classification questions (default 16)"
    )
    p.add_argument("--lengths", default=None, help="continuation lengths, comma-separated (default 32,128,256)")
    p.add_argument("--batches", default=None, help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--batched-lengths", default=None, help="continuation lengths run batched too (default: all)")
    p.add_argument("--thresholds", default=None, help="parallel decoding thresholds (default 0.9,0.7,0.5)")
    p.add_argument("--threshold", type=float, default=None, help="one threshold (same as --thresholds T)")
    p.add_argument("--speculative", default=None, help="self-speculative rows: draft lengths, comma-separated")
    p.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    p.add_argument("--skip-training", action="store_true")
    return p.parse_args(argv)


def _numbers(text: str | None, kind) -> tuple | None:
    return tuple(kind(x) for x in text.split(",") if x.strip()) if text else None


def card_settings(args) -> CardSettings:
    s = TINY_CARD if args.tiny else CardSettings()
    thresholds = _numbers(args.thresholds, float) or ((args.threshold,) if args.threshold else None)
    lengths = _numbers(args.lengths, int)
    return replace(
        s,
        prompts=args.prompts or s.prompts,
        questions=args.questions or s.questions,
        batched_lengths=_numbers(args.batched_lengths, int) or s.batched_lengths,
        continuation_lengths=lengths or s.continuation_lengths,
        goal_length=s.goal_length if not lengths or s.goal_length in lengths else lengths[0],
        batches=_numbers(args.batches, int) or s.batches,
        thresholds=thresholds or s.thresholds,
        speculative=_numbers(args.speculative, int) or s.speculative,
    )


def load_pair(paths: list[str], what: str, device) -> Pair:
    """An AR and a diffusion checkpoint of the same shape, in either order, as models in eval mode."""
    if len(paths) != 2:
        raise NanoLladaError(f"{what}: give two checkpoints, an AR model and a diffusion model of its size")
    checkpoints = {checkpoint.kind: (path, checkpoint) for path, checkpoint in zip(paths, map(read_checkpoint, paths))}
    if set(checkpoints) != {"ar", "diffusion"}:
        raise NanoLladaError(f"{what}: {' and '.join(paths)} are not one AR and one diffusion checkpoint")
    (ar_path, ar), (diffusion_path, diffusion) = checkpoints["ar"], checkpoints["diffusion"]
    differ = shape_difference(ar.config, diffusion.config)
    if differ:
        raise NanoLladaError(
            f"{what}: {ar_path} and {diffusion_path} differ in {', '.join(differ)}; the card compares models of the "
            "same shape"
        )
    models = [build_model(c, path).to(device).eval() for path, c in (checkpoints["ar"], checkpoints["diffusion"])]
    names = {"ar": str(ar_path), "diffusion": str(diffusion_path), "parameters": ar.config.num_parameters()}
    return Pair(*models, names, trained_block_size(diffusion.extra))


def random_pair(device) -> Pair:
    """--tiny: random tiny models, so CI exercises every code path in seconds; their figures mean nothing."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(Transformer(preset("tiny")).to(device).eval())
    return Pair(*models, {"ar": "random (smoke run)", "diffusion": "random (smoke run)", "parameters": 0})


def checkpoint_lists(args) -> tuple[list[str], list[str]]:
    pair = list(args.checkpoint) + ([args.ar_checkpoint] if args.ar_checkpoint else [])
    sft = list(args.sft_checkpoint)
    if args.models:
        folder = Path(args.models)
        pair = pair or [str(folder / name) for name in REPORT_MODELS["checkpoint"]]
        sft = sft or [str(folder / name) for name in REPORT_MODELS["sft_checkpoint"]]
    return pair, sft


def card_inputs(args, s: CardSettings, device, notes: list[str]) -> tuple[dict, object, int | None]:
    """({"base": (pair, continuation workloads), "sft": (SFT pair, classification workload)}, tokenizer, mask id).
    The tokenizer (and its packages) is loaded only for trained pairs: --tiny and a training-only run need none."""
    pair_paths, sft_paths = checkpoint_lists(args)
    out = {}
    if args.tiny and not pair_paths:
        pair = random_pair(device)
        g = torch.Generator().manual_seed(0)
        prompts = [
            [BOS_ID, *torch.randint(3, 6400, (s.prompt_tokens,), generator=g).tolist()] for _ in range(s.prompts)
        ]
        out["base"] = (pair, [Workload("continuation", n, prompts) for n in s.continuation_lengths])
        out["sft"] = (pair, [Workload("classification", s.classification_length, prompts)])  # no labels to score
        notes.append("Smoke run: random tiny models and random prompts; the figures check the code, not a speed.")
        return out, None, pair.diffusion.config.vocab_size - 1  # <|mask|> is the last id
    if not (pair_paths or sft_paths):
        notes.append("No trained pair given (--checkpoint x2 or --models DIR): no speed card, training only.")
        return out, None, None
    from scripts.common.evaluation.answers import sft_questions  # (tqdm and the tokenizer's packages: only here)

    # The pairs are checked before any data is read, so a wrong pair is named even without the sample data.
    base = load_pair(pair_paths, "--checkpoint", device) if pair_paths else None
    sft = load_pair(sft_paths, "--sft-checkpoint", device) if sft_paths else None
    tokenizer = load_tokenizer(args.tokenizer_dir)
    if base is not None:
        prompts = continuation_prompts(args.continuation_data, tokenizer, s.prompts, s.prompt_tokens)
        out["base"] = (base, [Workload("continuation", n, prompts) for n in s.continuation_lengths])
    if sft is not None:
        items = sft_questions(args.classification_data, tokenizer, s.questions)
        workload = Workload("classification", s.classification_length, [q for q, _ in items], [a for _, a in items])
        out["sft"] = (sft, [workload])
    return out, tokenizer, mask_token_id(tokenizer)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.device)  # an unknown or absent device is one line, as in every entry point
    s = card_settings(args)
    notes: list[str] = []
    inputs, tokenizer, mask_id = card_inputs(args, s, device, notes)
    card = None
    if inputs:
        card = measure_card(inputs, s, device, tokenizer, mask_id, print)
        card["models"] = {key: pair.names for key, (pair, _) in inputs.items()}
    train = TINY if args.tiny or device.type == "cpu" else BenchSettings()
    train = replace(train, compile=train.compile and not args.no_compile)
    training = {}
    if not args.skip_training and (args.tiny or device.type == "cuda"):
        for kind in ("ar", "diffusion"):
            print(f"training {kind} ...", flush=True)
            training[kind] = bench_training(kind, preset(train.preset), train, device)
        training["diffusion_vs_ar"] = training["diffusion"]["tokens_per_s"] / training["ar"]["tokens_per_s"]
    report = machine_record(device, args.tiny)
    report |= {
        "threads": torch.get_num_threads(),
        "clock": "cpu_time" if device.type == "cpu" else "wall",  # speed_card.clock_for
        "card_settings": asdict(s),
        "card": card,
        "training_settings": asdict(train),
        "training_model_parameters": preset(train.preset).num_parameters(),
        "compiled": bool(training) and all(training[kind]["compiled"] for kind in ("ar", "diffusion")),
        "flops_per_token_training": training_flops_per_token(preset(train.preset), train.seq_len),
        "training": training,
        "notes": notes,
    }
    write_report(report, args.out)
    return report


def machine_record(device: torch.device, smoke: bool) -> dict:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {
        "device": name,
        "device_type": device.type,
        "date": datetime.date.today().isoformat(),
        "smoke_test": smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git_commit(),
    }


def write_report(report: dict, out: str | None) -> None:
    """The JSON, its markdown card beside it (.md, also printed) and the quality-against-speed plot (.png)."""
    name = report["device"].lower().replace("nvidia", "")
    slug = "cpu" if report["device_type"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", name).strip("_")
    kind = "smoke" if report["smoke_test"] else "speed_card"
    path = Path(out or ROOT / "benchmarks" / "results" / f"{kind}_{slug}_{report['date']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    path.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    plotted = plot_card(report, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.md')}" + (f" and {plotted}" if plotted else ""))


if __name__ == "__main__":
    run_main(main)
