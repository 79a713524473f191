"""Multiple choice by likelihood (C-Eval / CMMLU style) for AR and diffusion checkpoints.

uv run python -m scripts.eval.eval_multiple_choice --checkpoint weights/pretrain_ar.pt --tokenizer-dir . \
    --data ceval/val [--data more.csv ...] [--predictions-out preds.jsonl]

Data. Files with a question, options A, B, C, D (more letters are fine) and the answer letter, as .csv (with a
header) or .jsonl; column names are case-insensitive, so both C-Eval's `id,question,A,B,C,D,answer,explanation`
and CMMLU's `,Question,A,B,C,D,Answer` work. A directory means every .csv/.jsonl in it. The real sets are on
ModelScope (not downloaded here; ids as listed there, check before use): C-Eval, `opencompass/ceval-exam`
(52 subjects, one csv per subject and split; use `val`: `test` has no answers), and CMMLU,
`opencompass/cmmlu` (67 subjects), e.g. `modelscope download --dataset opencompass/ceval-exam --local_dir ceval`.

Prompt (zero-shot, the C-Eval paper's answer-only layout without the subject header), [BOS] + text for base
models, the chat template with --chat:
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：
Continuation (--continuation):
- `letter` (default): score the answer letter ("A" ... "D", one token each). All choices then have the same
  length, so summed log-probs compare fairly (no bias towards short option texts), and a one-token answer
  makes the diffusion estimate exact in one forward (LLaDA uses mc_num 1 for C-Eval/CMMLU for this reason).
  It asks the model to know the letter convention, which small base models learn poorly: expect near 25%.
- `option`: score the option text itself (lm-eval's ARC/HellaSwag style), unnormalised sum of log-probs
  (nats). Small models can use their knowledge of the content; longer options are penalised.
Scores: AR, the exact sum of log-probs of the continuation; diffusion, the Monte-Carlo conditional
log-likelihood (LLaDA Algorithm 3, a lower bound in expectation) with --mc-samples draws, all choices and draws
of one question batched into shared forwards (at most --max-forward-tokens tokens each). The prediction is
the highest-scoring choice; accuracy's s.e. is sqrt(p(1-p)/n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scripts.common.cli import parse, pick_device, run_main
from scripts.common.data.readers import write_jsonl
from scripts.common.evaluation.loading import Device, add_checkpoint_flags, load_any_kind
from scripts.common.evaluation.multiple_choice import (
    ScoringSettings,
    add_choice_flags,
    evaluate_question_sets,
    load_question_sets,
)
from scripts.common.settings import add_flags, settings_from


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "AR or diffusion checkpoint (kind read from the file) or a MiniMind2 .pth")
    add_choice_flags(p)
    p.add_argument(
        "--predictions-out", default=None, help="write one json line per question (scores, prediction, correct)"
    )
    add_flags(p, Device)
    return parse(p, argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = settings_from(ScoringSettings, args)
    question_sets = load_question_sets(args.data, args.limit)
    device = pick_device(args.device)
    model, tokenizer, kind, block_size = load_any_kind(
        args.checkpoint, args.tokenizer_dir, device, args.num_attention_heads
    )
    summaries, items = evaluate_question_sets(
        model, kind, tokenizer, question_sets, settings, device, args.dtype, block_size
    )
    chance = sum(1 / len(item["scores"]) for item in items) / len(items)
    for name, s in summaries.items():
        print(f"{name}: accuracy {s['accuracy']:.4f} ± {s['stderr']:.4f} over {s['items']} questions")
    print(f"[{kind} checkpoint {args.checkpoint}; scored the {settings.continuation}; chance ≈ {chance:.2f}]")
    if args.predictions_out:
        out = Path(args.predictions_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out, items)
    return {"kind": kind, "summaries": summaries, "items": items}


if __name__ == "__main__":
    run_main(main)
