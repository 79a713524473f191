"""The speed card of scripts/bench.py: AR decoding (KV cache) against every diffusion mode of a model of the same
shape on the same held-out prompts, in tokens/s of content (before EOS) with the quality of that content beside it.
benchmarks/README.md defines every workload, mode and figure.

Timing: one clock around each batch's decode. On CUDA the synchronised wall clock; on a CPU the process's CPU time,
which counts only this run's work on a shared machine (the wall time is recorded too). AR is timed before and after
the diffusion modes and averaged; `ar_drift` (first time over second) shows how much the machine's speed moved.
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from model.config import shape_difference
from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig, generate, generate_batch
from model.inference.padding import left_pad
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.inference.speculative import SpeculativeConfig, speculative_generate
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, decode, encode
from scripts.common.bench.quality import generative_perplexity, mean_unigram_entropy
from scripts.common.data.packing import chunks
from scripts.common.data.sentiment import parse_sentiment
from scripts.common.device import autocast, synchronize
from scripts.common.settings import flag

AR_MODE, BASELINE_MODE = "ar_kv_cache", "llada_baseline"


@dataclass
class CardSettings:
    """What the card decodes; the fields declared with flag() are scripts.bench's flags of the same names."""

    continuation_lengths: list[int] = flag([32, 128, 256], "continuation lengths (new tokens)", "--lengths")
    classification_length: int = 8  # a label is two tokens; 8 leave room, as eval_sft_accuracy does
    batches: list[int] = flag([1, 16], "batch sizes (one wider than a workload's prompts is skipped)")
    prompts: int = flag(16, "continuation prompts (batch 1 decodes them one at a time)", low=1)
    questions: int = flag(16, "classification questions", low=1)
    batched_lengths: list[int] = flag([], "continuation lengths that also run batched (default: all)")
    prompt_tokens: int = 16
    block_size: int = 32  # semi-autoregressive blocks where they tile the answer, else one block
    thresholds: list[float] = flag([0.9, 0.5], "parallel decoding thresholds")
    factors: tuple[float, ...] = (1.0,)  # Fast-dLLM's factor rule: the commit bar adapts to the block's confidences
    tokens_per_step: tuple[int, ...] = (2, 4)  # LLaDA's fixed schedule with fewer steps than tokens
    lookahead_blocks: int = 1  # the smaller-canvas lever: masked blocks seen past the current one
    goal_length: int = 128  # the goal: diffusion >= AR in content tokens/s at batch 1 for answers this long,
    goal_tolerance: float = 0.10  # at a generative perplexity within this fraction of the LLaDA baseline's
    dtype: str = "bfloat16"  # autocast on CUDA; CPU runs float32
    speculative: list[int] = flag([], "self-speculative rows: draft lengths k (the diffusion model's AR greedy output)")


TINY_CARD = CardSettings(continuation_lengths=[16], batches=[1, 2], prompts=2, prompt_tokens=8, block_size=8,
                         thresholds=[0.9], goal_length=16)  # fmt: skip


@dataclass
class Pair:
    """An AR model and the diffusion model of the same shape it is compared with; `trained_block`: the block size a
    block-trained diffusion checkpoint decodes block-causally with (None: bidirectional)."""

    ar: torch.nn.Module
    diffusion: torch.nn.Module
    names: dict
    trained_block: int | None = None

    def __post_init__(self) -> None:
        differ = shape_difference(self.ar.config, self.diffusion.config)
        if differ:
            pair = " and ".join(str(self.names[k]) for k in ("ar", "diffusion") if k in self.names) or "these"
            raise NanoLladaError(f"the card compares models of the same shape; {pair} differ in {', '.join(differ)}")


@dataclass
class Workload:
    name: str  # continuation | classification
    gen_length: int
    prompts: list[list[int]]
    labels: list[str] | None = None  # classification: the gold label of each prompt


@dataclass
class Run:
    outputs: list[list[int]] = field(default_factory=list)  # content ids per prompt
    seconds: float = 0.0  # every batch, by the card's clock (timed_run)
    wall_seconds: float = 0.0
    first_seconds: float = 0.0  # summed over batches: first token (AR) or first final block (diffusion)
    forward_passes: int = 0  # over every batch; one forward runs a whole batch
    batches: int = 0

    def add(self, outputs: list[list[int]], seconds: float, first: float, forwards: int, wall: float = 0.0) -> None:
        self.outputs += outputs
        self.seconds, self.first_seconds = self.seconds + seconds, self.first_seconds + first
        self.wall_seconds += wall
        self.forward_passes, self.batches = self.forward_passes + forwards, self.batches + 1


def continuation_prompts(path: str | Path, tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:
    """BOS + the first `prompt_tokens` tokens of the first `count` held-out texts at least twice that long."""
    if not Path(path).exists():
        raise NanoLladaError(f"{path} not found: build the offline sample with `python -m scripts.data.sample`")
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        ids = encode(tokenizer, json.loads(line)["text"]) if line.strip() else []
        if len(ids) >= 2 * prompt_tokens:
            prompts.append([BOS_ID, *ids[:prompt_tokens]])
        if len(prompts) == count:
            return prompts
    raise NanoLladaError(f"{path}: fewer than {count} texts of {2 * prompt_tokens}+ tokens; pass fewer --prompts")


def decoding_modes(gen_length: int, s: CardSettings, trained_block: int | None) -> dict:
    """Mode name -> diffusion sampler (None: AR with its KV cache); benchmarks/README.md says what each does. A
    block-trained model decodes block-causally (exact cache) with the finish at EOS as its only lever."""
    block = s.block_size if gen_length % s.block_size == 0 else gen_length
    base = DiffusionSamplerConfig(gen_length=gen_length, steps=gen_length, block_size=block)
    if trained_block:
        base = replace(base, block_causal=True, block_size=trained_block)
    modes = {AR_MODE: None, BASELINE_MODE: base}
    first = replace(base, threshold=s.thresholds[0])
    modes[f"threshold_{s.thresholds[0]:g}"] = first
    fast = replace(base, finish_at_eos=True)
    if not trained_block:
        for cache in ("prefix", "dual"):
            modes[f"threshold_{s.thresholds[0]:g}_{cache}_cache"] = replace(first, cache=cache)
        fast = replace(fast, cache="dual", lookahead_blocks=s.lookahead_blocks)
    for t in s.thresholds:
        modes[f"fast_{t:g}"] = replace(fast, threshold=t)
    for f in s.factors:  # threshold 1: only the factor rule commits (and the most confident position)
        modes[f"fast_factor_{f:g}"] = replace(fast, threshold=1.0, commit_factor=f)
    for k in s.tokens_per_step:
        if gen_length % k == 0 and gen_length // k >= gen_length // base.block_size:
            modes[f"fast_{k}_per_step"] = replace(fast, steps=gen_length // k)
    for k in s.speculative:  # not a sampler: a draft length and the answer length (diffusion_run)
        modes[f"speculative_k{k}"] = (SpeculativeConfig(k), gen_length)
    return modes


def timed_run(prompts: list[list[int]], batch: int, device, decode) -> Run:
    """Each batch of `prompts` decoded by `decode(chunk, mark) -> (rows of ids, forward passes)` under the card's
    clock; `mark()` notes the first token's (AR) or the first final block's (diffusion) time."""
    run = Run()
    # CPU time on a CPU (other jobs' work is not counted), the wall clock on an accelerator (which runs async)
    now = time.process_time if torch.device(device).type == "cpu" else time.perf_counter
    for chunk in chunks(prompts, batch):
        marks = []

        def mark(*_) -> None:
            if not marks:
                synchronize(device)
                marks.append(now())

        synchronize(device)
        wall, start = time.perf_counter(), now()
        rows, forwards = decode(chunk, mark)
        synchronize(device)
        seconds, wall = now() - start, time.perf_counter() - wall
        first = marks[0] - start if marks else seconds
        run.add([strip_after_eos(row, EOS_ID) for row in rows], seconds, first, forwards, wall)  # content: before EOS
    return run


def ar_run(model, prompts: list[list[int]], gen_length: int, batch: int, device, dtype: str, mask_id: int) -> Run:
    greedy = ARSamplerConfig(banned_ids=(mask_id,))

    def decode(chunk, mark):
        calls = []

        def seen(*_) -> None:  # the end of the first forward is the first token's time
            calls.append(1)
            mark()

        hook = model.register_forward_hook(seen)
        try:
            with autocast(device, dtype):
                if len(chunk) == 1:
                    return [list(generate(model, chunk[0], gen_length, greedy, EOS_ID))], len(calls)
                return generate_batch(model, chunk, gen_length, greedy, EOS_ID, pad_id=PAD_ID), len(calls)
        finally:
            hook.remove()

    return timed_run(prompts, batch, device, decode)


def diffusion_run(model, prompts, mode, batch: int, device, dtype: str, mask_id) -> Run:
    """`mode`: a diffusion sampler, or (SpeculativeConfig, new tokens) for self-speculative decoding
    (model/inference/speculative.py)."""

    def decode(chunk, mark):
        if isinstance(mode, tuple):
            with autocast(device, dtype):
                out = speculative_generate(model, chunk, mode[1], mask_id, mode[0], EOS_ID, PAD_ID, (mask_id,))
            return out.tokens, out.forwards
        ids, lengths = left_pad(chunk, PAD_ID, device)
        with autocast(device, dtype):
            out = diffusion_generate(model, ids, mode, mask_id, EOS_ID, on_block=mark, prompt_lengths=lengths)
        return out.tokens.tolist(), out.nfe

    return timed_run(prompts, batch, device, decode)


def card_row(workload: Workload, batch: int, mode: str, run: Run, ar_model, tokenizer) -> dict:
    """One line of the card: speed figures of `run`, and quality figures of the text it decoded."""
    rows, content, forwards = len(run.outputs), sum(map(len, run.outputs)), run.forward_passes / run.batches
    row = {
        "workload": workload.name, "gen_length": workload.gen_length, "batch": batch, "mode": mode, "prompts": rows,
        "content_tokens": content, "mean_content_length": content / rows, "seconds": run.seconds,
        "wall_seconds": run.wall_seconds, "content_tokens_per_s": content / run.seconds,
        "first_token_seconds": run.first_seconds / run.batches,  # diffusion: its first final block
        "forward_passes": forwards,  # per batch
        "tokens_per_forward": content / rows / forwards,  # per row
        "generative_perplexity": generative_perplexity(ar_model, workload.prompts, run.outputs),
        "unigram_entropy": mean_unigram_entropy(run.outputs), "accuracy": None, "unparseable": None,
    }  # fmt: skip
    if workload.labels is not None:
        said = [parse_sentiment(decode(tokenizer, ids)) for ids in run.outputs]
        row["accuracy"] = sum(s == gold for s, gold in zip(said, workload.labels)) / rows
        row["unparseable"] = sum(s is None for s in said)
    return row


def measure_workload(pair: Pair, workload: Workload, s: CardSettings, device, tokenizer, mask_id: int, log) -> list:
    """Every mode at every batch size on one workload, with the ratios to AR and to the LLaDA baseline."""
    rows, modes = [], decoding_modes(workload.gen_length, s, pair.trained_block)
    batched = not s.batched_lengths or workload.gen_length in s.batched_lengths
    for batch in s.batches:
        if (batch > 1 and workload.name == "continuation" and not batched) or batch > len(workload.prompts):
            continue  # a batch wider than the prompts would be mislabelled
        if pair.trained_block and batch > 1 and len(set(map(len, workload.prompts))) > 1:
            log(f"  {workload.name} batch {batch}: block-causal decoding batches equal prompt lengths only; skipped")
            continue
        ar_args = (workload.prompts, workload.gen_length, batch, device, s.dtype, mask_id)
        before = ar_run(pair.ar, *ar_args)
        runs = {
            name: diffusion_run(pair.diffusion, workload.prompts, mode, batch, device, s.dtype, mask_id)
            for name, mode in modes.items()
            if mode is not None
        }
        after = ar_run(pair.ar, *ar_args)  # the AR time is the mean of the two, and their ratio the drift
        times = ("seconds", "wall_seconds", "first_seconds")
        runs[AR_MODE] = replace(before, **{t: (getattr(before, t) + getattr(after, t)) / 2 for t in times})
        group = [card_row(workload, batch, name, runs[name], pair.ar, tokenizer) for name in modes]
        ar_rate, baseline_ppl = group[0]["content_tokens_per_s"], group[1]["generative_perplexity"]
        for row in group:
            ppl = row["generative_perplexity"]
            row["speed_vs_ar"] = row["content_tokens_per_s"] / ar_rate if ar_rate else None
            row["perplexity_vs_baseline"] = ppl / baseline_ppl if ppl and baseline_ppl else None
            row["ar_drift"] = before.seconds / after.seconds
            log(f"  {workload.name} {workload.gen_length} batch {batch} {row['mode']}: "
                f"{row['content_tokens_per_s']:,.1f} content tokens/s ({row['speed_vs_ar']:.2f}x AR), "
                f"{row['forward_passes']:.1f} forwards, perplexity {row['generative_perplexity']}")  # fmt: skip
        rows += group
    return rows


def goal_verdict(rows: list[dict], s: CardSettings) -> dict | None:
    """The issue's goal on the continuation workload at batch 1 and `goal_length`: the fastest diffusion mode whose
    generative perplexity is within `goal_tolerance` of the LLaDA baseline's, and whether it reaches AR's rate."""
    diffusion = [r for r in rows if (r["workload"], r["batch"], r["gen_length"]) == ("continuation", 1, s.goal_length)
                 and r["mode"] != AR_MODE]  # fmt: skip
    if not diffusion:
        return None
    ratio = "perplexity_vs_baseline"
    within = [r for r in diffusion if r[ratio] and abs(r[ratio] - 1) <= s.goal_tolerance]
    best = max(within, key=lambda r: r["content_tokens_per_s"], default={})
    fastest = max(diffusion, key=lambda r: r["content_tokens_per_s"])
    return {
        "gen_length": s.goal_length, "tolerance": s.goal_tolerance, "met": bool(best and best["speed_vs_ar"] >= 1),
        "best_mode": best.get("mode"), "best_speed_vs_ar": best.get("speed_vs_ar"),
        "best_perplexity_vs_baseline": best.get(ratio), "fastest_mode": fastest["mode"],
        "fastest_speed_vs_ar": fastest["speed_vs_ar"], "fastest_perplexity_vs_baseline": fastest[ratio],
    }  # fmt: skip


def measure_card(pairs: dict[str, tuple[Pair, list[Workload]]], s: CardSettings, device, tokenizer, mask_id, log):
    """{"rows": every card row, "goal": goal_verdict}: each pair ("base", "sft") decodes its workloads."""
    rows = []
    for pair, workloads in pairs.values():
        # one short untimed decode per model first, so first-call allocations are not charged to the first mode
        ar_run(pair.ar, [[BOS_ID, 3, 4, 5]], 4, 1, device, "float32", mask_id)
        warm = DiffusionSamplerConfig(gen_length=4, steps=4)
        diffusion_run(pair.diffusion, [[BOS_ID, 3, 4, 5]], warm, 1, device, "float32", mask_id)
        for workload in workloads:
            log(f"{workload.name}, {workload.gen_length} new tokens, {len(workload.prompts)} prompts ...")
            rows += measure_workload(pair, workload, s, device, tokenizer, mask_id, log)
    return {"rows": rows, "goal": goal_verdict(rows, s)}
