"""Speed benchmark: the speed card (diffusion decoding against AR decoding of the same model size, both trained, in
content tokens/s with quality beside it) and training throughput of both routes (CUDA and --tiny).

    python -m scripts.bench --checkpoint AR.pt --checkpoint DIFF.pt \
        [--sft-checkpoint AR_SFT.pt --sft-checkpoint DIFF_SFT.pt]
    python -m scripts.bench --models weights/report   # the report's models, by their names in that folder
    python -m scripts.bench --tiny                    # CI smoke run: random tiny models, labelled, never a figure

Writes JSON, a markdown card (printed) and a plot of quality against speed to benchmarks/results/; benchmarks/README.md
defines every figure. Benchmarks print numbers; they assert nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from model.checkpoint import build_model, read_checkpoint
from model.config import preset
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import BOS_ID, load_tokenizer, mask_token_id
from model.transformer import Transformer
from scripts.common.bench.card import TINY_CARD, CardSettings, Pair, Workload, continuation_prompts, measure_card
from scripts.common.bench.report import machine_record, write_report
from scripts.common.bench.training import TINY, BenchSettings, bench_training, training_flops_per_token
from scripts.common.cli import parse, pick_device, run_main
from scripts.common.settings import add_flags, flag_fields

# The report's models (scripts.report_experiments --part conversion, into weights/report/): the AR model, its
# default conversion (logit shift, bidirectional), and their SFT versions on the review-sentiment task.
RANDOM = "random (smoke run)"
REPORT_MODELS = {
    "checkpoint": ("ar_state_dict.pt", "a2d_shift_state_dict.pt"),
    "sft_checkpoint": ("ar_sft_state_dict.pt", "sft_a2d_shift_state_dict.pt"),
}


@dataclass
class BenchOptions:
    """What the command line asks for besides the card's and the training's settings, read once from argv."""

    device: torch.device
    tiny: bool
    out: str | None
    pair: list[str]  # an AR and a diffusion checkpoint (either order), or none
    sft_pair: list[str]
    tokenizer_dir: str
    continuation_data: str
    classification_data: str
    train: bool  # measure training throughput (CUDA, or the --tiny smoke run)


def parse_args(argv=None) -> tuple[BenchOptions, CardSettings, BenchSettings]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="smoke run for CI: random tiny models, never a speed figure")
    p.add_argument("--out", default=None, help="JSON path; default benchmarks/results/<card|smoke>_<device>_<date>")
    p.add_argument("--checkpoint", action="append", default=[], help="the pair: an AR and a diffusion checkpoint")
    p.add_argument("--sft-checkpoint", action="append", default=[], help="the SFT pair (classification workload)")
    p.add_argument("--models", default=None, help="a folder with the report's four models (names: REPORT_MODELS)")
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--continuation-data", default="dataset/sample_pretrain_val.jsonl")
    p.add_argument("--classification-data", default="dataset/sample_sft_test.jsonl")
    p.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    p.add_argument("--skip-training", action="store_true")
    tiny = argparse.ArgumentParser(add_help=False)
    tiny.add_argument("--tiny", action="store_true")
    card = TINY_CARD if tiny.parse_known_args(argv)[0].tiny else CardSettings()  # --tiny: the card's defaults too
    names = [f.name for f in flag_fields(CardSettings)]
    add_flags(p.add_argument_group("the card"), CardSettings, **{name: getattr(card, name) for name in names})
    args = parse(p, argv)
    device = pick_device(args.device)  # an unknown or absent device is one line, as in every entry point
    card = replace(card, **{name: getattr(args, name) for name in names})
    if card.goal_length not in card.continuation_lengths:
        card = replace(card, goal_length=card.continuation_lengths[0])
    training = TINY if args.tiny or device.type == "cpu" else BenchSettings()
    training = replace(training, compile=training.compile and not args.no_compile)
    train = not args.skip_training and (args.tiny or device.type == "cuda")
    pair, sft_pair = args.checkpoint, args.sft_checkpoint
    if args.models:
        pair = pair or [str(Path(args.models) / name) for name in REPORT_MODELS["checkpoint"]]
        sft_pair = sft_pair or [str(Path(args.models) / name) for name in REPORT_MODELS["sft_checkpoint"]]
    options = BenchOptions(device, args.tiny, args.out, pair, sft_pair, args.tokenizer_dir, args.continuation_data,
                           args.classification_data, train)  # fmt: skip
    return options, card, training


def load_pair(paths: list[str], what: str, device) -> Pair:
    """An AR and a diffusion checkpoint of the same shape, in either order, as models in eval mode."""
    if len(paths) != 2:
        raise NanoLladaError(f"{what}: give two checkpoints, an AR model and a diffusion model of its size")
    checkpoints = {checkpoint.kind: (path, checkpoint) for path, checkpoint in zip(paths, map(read_checkpoint, paths))}
    if set(checkpoints) != {"ar", "diffusion"}:
        raise NanoLladaError(f"{what}: {' and '.join(paths)} are not one AR and one diffusion checkpoint")
    (ar_path, ar), (diffusion_path, diffusion) = checkpoints["ar"], checkpoints["diffusion"]
    models = [build_model(c, path).to(device).eval() for path, c in ((ar_path, ar), (diffusion_path, diffusion))]
    names = {"ar": ar_path, "diffusion": diffusion_path, "parameters": ar.config.num_parameters()}
    return Pair(*models, names, trained_block_size(diffusion.extra))


def random_model(seed: int, device) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny")).to(device).eval()


def card_inputs(o: BenchOptions, s: CardSettings, notes: list[str]) -> tuple[dict, object, int | None]:
    """({"base": (pair, continuation workloads), "sft": (SFT pair, classification workload)}, tokenizer, mask id).
    The tokenizer (and its packages) is loaded only for trained pairs: --tiny and a training-only run need none."""
    if o.tiny and not o.pair:  # random tiny models, so CI exercises every code path in seconds
        names = {"ar": RANDOM, "diffusion": RANDOM, "parameters": 0}
        pair = Pair(random_model(0, o.device), random_model(1, o.device), names)
        g = torch.Generator().manual_seed(0)
        random_ids = [torch.randint(3, 6400, (s.prompt_tokens,), generator=g).tolist() for _ in range(s.prompts)]
        prompts = [[BOS_ID, *ids] for ids in random_ids]
        continuations = [Workload("continuation", n, prompts) for n in s.continuation_lengths]
        notes.append("Smoke run: random tiny models and random prompts; the figures check the code, not a speed.")
        classification = Workload("classification", s.classification_length, prompts)
        inputs = {"base": (pair, continuations), "sft": (pair, [classification])}
        return inputs, None, pair.diffusion.config.vocab_size - 1  # <|mask|> is the last id
    if not (o.pair or o.sft_pair):
        notes.append("No trained pair given (--checkpoint x2 or --models DIR): no speed card, training only.")
        return {}, None, None
    from scripts.common.evaluation.answers import sft_questions  # (tqdm and the tokenizer's packages: only here)

    # The pairs are checked before any data is read, so a wrong pair is named even without the sample data.
    base = load_pair(o.pair, "--checkpoint", o.device) if o.pair else None
    sft = load_pair(o.sft_pair, "--sft-checkpoint", o.device) if o.sft_pair else None
    tokenizer, inputs = load_tokenizer(o.tokenizer_dir), {}
    if base is not None:
        prompts = continuation_prompts(o.continuation_data, tokenizer, s.prompts, s.prompt_tokens)
        inputs["base"] = (base, [Workload("continuation", n, prompts) for n in s.continuation_lengths])
    if sft is not None:
        items = sft_questions(o.classification_data, tokenizer, s.questions)
        workload = Workload("classification", s.classification_length, [q for q, _ in items], [a for _, a in items])
        inputs["sft"] = (sft, [workload])
    return inputs, tokenizer, mask_token_id(tokenizer)


def main(argv: list[str] | None = None) -> dict:
    options, s, train = parse_args(argv)
    notes: list[str] = []
    inputs, tokenizer, mask_id = card_inputs(options, s, notes)
    card = None
    if inputs:
        card = measure_card(inputs, s, options.device, tokenizer, mask_id, print)
        card["models"] = {key: pair.names for key, (pair, _) in inputs.items()}
    training = {}
    for kind in ("ar", "diffusion") if options.train else ():
        print(f"training {kind} ...", flush=True)
        training[kind] = bench_training(kind, preset(train.preset), train, options.device)
    if training:
        training["diffusion_vs_ar"] = training["diffusion"]["tokens_per_s"] / training["ar"]["tokens_per_s"]
    report = machine_record(options.device, options.tiny) | {
        "card_settings": asdict(s),
        "card": card,
        "training_settings": asdict(train),
        "training_model_parameters": preset(train.preset).num_parameters(),
        "compiled": bool(training) and all(training[kind]["compiled"] for kind in ("ar", "diffusion")),
        "flops_per_token_training": training_flops_per_token(preset(train.preset), train.seq_len),
        "training": training,
        "notes": notes,
    }
    write_report(report, options.out)
    return report


if __name__ == "__main__":
    run_main(main)
