"""Multiple choice by likelihood (C-Eval / CMMLU style) for AR and diffusion checkpoints: reading question files,
the answer-only prompt, scoring each choice's continuation, accuracy. Used by scripts.eval.eval_multiple_choice
(whose docstring gives the data format and the scoring rules) and scripts.eval.compare."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from model.errors import NanoLladaError
from model.tokenizer import encode, prompt_ids
from scripts.common.cli import Bounded
from scripts.common.device import autocast
from scripts.common.evaluation.answers import answer_log_likelihoods
from scripts.common.settings import add_flags, flag

LETTERS = "ABCDEFGHIJ"
ANSWER_CUE = "答案："


@dataclass
class Question:
    source: str  # file:line, for messages and the predictions file
    id: str
    question: str
    options: dict[str, str]  # letter -> option text, in letter order
    answer: str


def question_of(path: Path, lineno: int, row: dict) -> Question:
    """Validate one row (a csv record or a jsonl object) into a Question, or fail naming file:line."""
    fields = {str(k).strip(): v for k, v in row.items() if k is not None}
    lower = {k.lower(): v for k, v in fields.items()}
    where = f"{path}:{lineno}"
    for name in ("question", "answer"):
        if name not in lower:
            raise NanoLladaError(
                f"{where}: no '{name}' field (this row has: {', '.join(fields) or 'nothing'}); "
                "expected question, A, B, C, D, answer"
            )
        if lower[name] is None:
            raise NanoLladaError(f"{where}: fewer columns than the header (no value for '{name}')")
    options = {}
    for letter in LETTERS:
        if letter not in fields and letter.lower() not in fields:
            break
        options[letter] = str(fields.get(letter, fields.get(letter.lower())) or "").strip()
    if len(options) < 2:
        raise NanoLladaError(f"{where}: needs option columns A and B at least (this row has: {', '.join(fields)})")
    answer = str(lower["answer"]).strip().upper()
    if not answer:
        raise NanoLladaError(f"{where}: empty answer (C-Eval's test split has no answers; evaluate on val)")
    if answer not in options:
        raise NanoLladaError(f"{where}: answer '{answer}' is not one of the options {', '.join(options)}")
    question = str(lower["question"]).strip()
    if not question:
        raise NanoLladaError(f"{where}: empty question")
    row_id = lower.get("id", fields.get("", lineno))
    return Question(where, str(row_id), question, options, answer)


def _jsonl_questions(path: Path) -> list[Question]:
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise NanoLladaError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise NanoLladaError(f"{path}:{lineno}: expected a JSON object with question, A, B, C, D, answer")
            questions.append(question_of(path, lineno, obj))
    return questions


def _csv_questions(path: Path) -> list[Question]:
    questions = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            if reader.fieldnames is None:  # reads the header
                raise NanoLladaError(f"{path}: empty csv; expected a header row question, A, B, C, D, answer")
            start = reader.line_num + 1
            for row in reader:
                if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    questions.append(question_of(path, start, row))
                start = reader.line_num + 1
        except csv.Error as err:
            raise NanoLladaError(f"{path}:{reader.line_num}: malformed csv ({err})") from None
    return questions


def read_questions(path: str | Path) -> list[Question]:
    """Questions of one .csv or .jsonl file (see the module docstring for the columns)."""
    path = Path(path)
    if not path.is_file():
        raise NanoLladaError(f"{path}: multiple-choice file not found (C-Eval/CMMLU csv from ModelScope, or a .jsonl)")
    if path.suffix not in (".csv", ".jsonl"):
        raise NanoLladaError(f"{path}: unsupported format '{path.suffix}'; use .csv (with a header) or .jsonl")
    try:
        questions = _jsonl_questions(path) if path.suffix == ".jsonl" else _csv_questions(path)
    except UnicodeDecodeError as err:  # e.g. a GBK-encoded export
        raise NanoLladaError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from None
    if not questions:
        raise NanoLladaError(f"{path}: no questions found")
    return questions


def prompt_text(question: Question) -> str:
    options = "".join(f"{letter}. {text}\n" for letter, text in question.options.items())
    return f"{question.question}\n{options}{ANSWER_CUE}"


@dataclass
class ScoringSettings:
    continuation: str = flag("letter", "score the answer letter or the option text", choices=["letter", "option"])
    chat: bool = flag(False, "wrap the prompt in the chat template (SFT models)")
    mc_samples: int = flag(
        128, "diffusion Monte-Carlo draws per multi-token choice (a one-token choice needs 1, exact)", low=1
    )
    max_forward_tokens: int = flag(32768, "rows x length per forward (bounds logits memory)", low=1)
    seed: int = flag(2026, "seeds the diffusion mask draws (the same for every question)")


@torch.no_grad()
def score_question(model, kind: str, tokenizer, question: Question, settings: ScoringSettings, block_size=None) -> dict:
    """Log-likelihood (and its Monte-Carlo s.e.; 0 when exact) of each choice's continuation given the prompt;
    block_size: a block-trained diffusion model, scored block by block."""
    context = prompt_ids(tokenizer, prompt_text(question), settings.chat)
    letters = list(question.options)
    texts = letters if settings.continuation == "letter" else [question.options[letter] for letter in letters]
    answers = [encode(tokenizer, text) or encode(tokenizer, " ") for text in texts]  # an empty option gets a token
    rows_per_forward = max(1, settings.max_forward_tokens // (len(context) + max(map(len, answers))))
    estimates = answer_log_likelihoods(  # tail None: a continuation, not a complete chat answer
        model, tokenizer, kind, context, answers, settings.mc_samples, block_size, settings.seed, None, rows_per_forward
    )
    scores, errors = [e[0] for e in estimates], [e[1] for e in estimates]
    prediction = letters[max(range(len(letters)), key=lambda i: scores[i])]
    return {
        "source": question.source,
        "id": question.id,
        "answer": question.answer,
        "prediction": prediction,
        "correct": prediction == question.answer,
        "scores": dict(zip(letters, scores)),
        "stderr": dict(zip(letters, errors)),
    }


def accuracy_summary(items: list[dict]) -> dict:
    n = len(items)
    p = sum(item["correct"] for item in items) / n
    return {"items": n, "accuracy": p, "stderr": math.sqrt(p * (1 - p) / n)}


def load_question_sets(paths: list[str], limit: int | None = None) -> dict[str, list[Question]]:
    """{file: its first `limit` questions} for every file named, a directory meaning its .csv/.jsonl files (sorted);
    read before any model loads."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl"))
            if not found:
                raise NanoLladaError(f"{path}: directory has no .csv or .jsonl files")
            files.extend(found)
        else:
            files.append(path)
    return {str(path): read_questions(path)[:limit] for path in files}


def evaluate_question_sets(
    model, kind, tokenizer, question_sets: dict, settings: ScoringSettings, device, dtype, block_size=None
) -> tuple[dict, list[dict]]:
    """({file or 'all': accuracy summary}, per-item predictions) over every question of `question_sets` (as
    load_question_sets reads them: {file: questions})."""
    summaries, items = {}, []
    for name, questions in question_sets.items():
        with autocast(device, dtype):
            file_items = [score_question(model, kind, tokenizer, q, settings, block_size) for q in questions]
        summaries[name] = accuracy_summary(file_items)
        items.extend(file_items)
    summaries["all"] = accuracy_summary(items)
    return summaries, items


def add_choice_flags(p, data_required: bool = True, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """The multiple-choice flags of scripts.eval.eval_multiple_choice, shared with scripts.eval.compare (which has its
    own --mc-samples and --seed for the LM numbers: its scoring flags take the prefix "choice_", and the plain
    spellings that are free stay theirs)."""
    data_help = ".csv/.jsonl file or directory of them; repeat for several"
    p.add_argument("--data", action="append", required=data_required, help=data_help)
    p.add_argument("--limit", type=int, action=Bounded, low=1, default=None, help="first N questions of each file")
    add_flags(p, ScoringSettings, prefix=prefix, skip=skip)
