"""Accuracy of SFT models on the held-out review-sentiment questions of the offline sample (or any SFT jsonl
whose last assistant turn is the gold label): exact match on the label, with the count of unparseable answers.
With --score-labels, also the accuracy of choosing the more likely label (AR: exact log-likelihood; diffusion:
LLaDA's Monte-Carlo conditional log-likelihood, per block for block-trained checkpoints), which tells a model that
cannot tell the labels apart from one whose decoding does not show what it knows.

uv run python -m scripts.eval.eval_sft_accuracy --tokenizer-dir . --data dataset/sample_sft_test.jsonl \
    --minimind-checkpoint weights/quick_ar_sft_state_dict.pt \
    --diffusion-checkpoint weights/quick_diffusion_sft_state_dict.pt
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint
from model.tokenizer import EOS_ID, encode
from scripts.common.cli import flag_names, output_file, parse, pick_device, run_main
from scripts.common.data.packing import chunks
from scripts.common.data.readers import write_jsonl
from scripts.common.data.sentiment import SENTIMENT_LABELS, parse_sentiment
from scripts.common.evaluation.answers import answer_log_likelihoods, sft_questions
from scripts.common.evaluation.generation import ar_answers, diffusion_answers
from scripts.common.evaluation.loading import SFTCheckpoints, load_checkpoint_for_eval
from scripts.common.evaluation.sampler_flags import SamplerFlags
from scripts.common.settings import add_flags, flag, settings_from


@dataclass
class Questions:
    """Which questions eval_sft_accuracy asks, how many at a time, and what it scores."""

    data: str = flag("dataset/sample_sft_test.jsonl", "SFT jsonl whose last assistant turn is the gold label")
    limit: int | None = flag(None, "only the first N questions", kind=int, low=1)
    max_new_tokens: int = flag(8, "answers are one label; 8 tokens leave room", low=1)
    batch_size: int | None = flag(
        None,
        "questions decoded together, left-padded (default: 16 on CUDA; 1 on CPU, where the cores are busy with one "
        "question already and padding only adds work)",
        kind=int,
        low=1,
    )
    score_labels: bool = flag(False, "also choose between the labels by likelihood")
    mc_samples: int = flag(32, "diffusion: mask draws per label for --score-labels", low=1)
    out: str | None = flag(None, "optional jsonl with every prediction")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, Questions)
    add_flags(p, SFTCheckpoints)
    add_flags(p, SamplerFlags)
    return parse(p, argv)


def decode_answers(
    name: str, kind: str, loaded, items, args, device, asked: DiffusionSamplerConfig
) -> tuple[list, DiffusionSamplerConfig | None]:
    """Every question's decoded answer, `--batch-size` at a time, and the diffusion settings used (None for AR);
    `asked`: the diffusion decoding the flags ask for."""
    model, tokenizer, checkpoint = loaded
    prompts, batching = [prompt for prompt, _ in items], dict(dtype=args.dtype, batch_size=args.batch_size)
    sampler = None
    if kind == "diffusion":
        with flag_names():
            sampler = sampler_for_checkpoint(checkpoint, asked)
        if sampler.block_causal:
            print(f"{name}: block-trained checkpoint: decoding block-causally with block size {sampler.block_size}")
    answers = []
    with tqdm(total=len(items), desc=f"{name} accuracy", leave=False) as bar, flag_names():
        for batch in chunks(prompts, args.batch_size):  # (in chunks for the progress bar)
            if sampler is None:
                answers += ar_answers(model, tokenizer, batch, args.max_new_tokens, device, **batching)
            else:
                answers += diffusion_answers(model, tokenizer, batch, sampler, device, **batching)
            bar.update(len(batch))
    return answers, sampler


def score_answers(name: str, items, answers, predictions: list) -> dict:
    """Accuracy of the decoded labels; appends one prediction record per question."""
    correct = unparseable = forwards = 0
    seconds = 0.0
    for i, ((_, gold), answer) in enumerate(zip(items, answers)):
        label = parse_sentiment(answer.text)
        # forward passes: those of the answer's batch (its denoising steps); seconds: its share of the batch's time
        forwards, seconds = forwards + answer.forward_passes, seconds + answer.seconds / answer.batch
        correct += label == gold
        unparseable += label is None
        predictions.append({"model": name, "index": i, "gold": gold, "answer": answer.text, "label": label})
    n = len(items)
    return {
        "questions": n,
        "correct": correct,
        "accuracy": correct / n,
        "unparseable": unparseable,
        "forward_passes_per_answer": forwards / n,
        "seconds_per_answer": seconds / n,
    }


def score_labels(name: str, kind: str, model, tokenizer, items, args, block_size, predictions: list) -> dict:
    """Accuracy of choosing the label whose answer (label + <|im_end|>) is more likely after each prompt (block_size:
    the estimator of a block-trained diffusion model); adds it to the last len(items) prediction records."""
    answers, chosen = [[*encode(tokenizer, label), EOS_ID] for label in SENTIMENT_LABELS], []
    for prompt, _ in tqdm(items, desc=f"{kind} label likelihood", leave=False):
        estimates = answer_log_likelihoods(model, tokenizer, kind, prompt, answers, args.mc_samples, block_size)
        chosen.append(SENTIMENT_LABELS[max(range(len(answers)), key=lambda i: estimates[i][0])])
    n, hits = len(items), sum(label == gold for label, (_, gold) in zip(chosen, items))
    for record, label in zip(predictions[-n:], chosen):
        record["likelihood_label"] = label
    print(
        f"{name}: choosing the more likely label: accuracy {hits / n:.3f} ({hits}/{n}), "
        f"chose {', '.join(f'{label} {chosen.count(label)}x' for label in SENTIMENT_LABELS)}"
        + ("" if kind == "ar" else f" ({args.mc_samples} mask draws per label)")
    )
    return {
        "likelihood_accuracy": hits / n,
        "likelihood_choices": {label: chosen.count(label) for label in SENTIMENT_LABELS},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    routes = settings_from(SFTCheckpoints, args).routes()
    device = pick_device(args.device)
    if args.batch_size is None:
        args.batch_size = 16 if device.type == "cuda" else 1
    if args.out:  # checked before any question is answered: the predictions are written only at the end
        output_file(args.out, "--out")
    asked = settings_from(SamplerFlags, args).asked(args.max_new_tokens)  # one token per step unless --gen-steps
    if args.diffusion_checkpoint:
        with flag_names():  # a bad decoding flag is named before any model is read or any question answered
            asked.check_arguments()  # the eval scripts' and server's check
    results, predictions = {}, []
    for name, path, kind in routes:
        loaded = load_checkpoint_for_eval(path, args.tokenizer_dir, kind, device)
        items = sft_questions(args.data, loaded[1], args.limit)
        answers, sampler = decode_answers(name, kind, loaded, items, args, device, asked)
        result = results[name] = score_answers(name, items, answers, predictions)
        print(
            f"{name}: accuracy {result['accuracy']:.3f} ({result['correct']}/{result['questions']}), "
            f"unparseable {result['unparseable']}, {result['forward_passes_per_answer']:.1f} forward passes "
            f"(of its batch) and {1000 * result['seconds_per_answer']:.1f} ms per answer "
            f"(batch {args.batch_size})  [{path}]"
        )
        if args.score_labels:  # a block-trained model's likelihood is estimated block by block, as it decodes
            block_size = sampler.block_size if sampler is not None and sampler.block_causal else None
            result.update(score_labels(name, kind, loaded[0], loaded[1], items, args, block_size, predictions))
    if args.out:
        write_jsonl(Path(args.out), predictions)
    return results


if __name__ == "__main__":
    run_main(main)
