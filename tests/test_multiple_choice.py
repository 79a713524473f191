"""Batched choice likelihoods (invariants) and multiple choice picking a planted answer, for both routes."""

import csv
import json
import math

import pytest
import torch
from conftest import ROOT, UniformModel
from test_eval_lm import repo_tokenizer, save_tiny, tiny_eval_config

from model.errors import NanoLladaError
from model.inference.likelihood import (
    ar_log_likelihood,
    ar_log_likelihood_batch,
    conditional_log_likelihood,
    conditional_log_likelihood_batch,
)
from model.tokenizer import encode
from model.transformer import Transformer
from scripts.common.cli import run_main
from scripts.common.evaluation.multiple_choice import read_questions
from scripts.eval import eval_multiple_choice

PROMPT, ANSWERS = [1, 5, 6, 7], [[9], [3, 4, 5], [10, 11], [12, 13, 14, 15, 16]]


def rng(seed):
    return torch.Generator().manual_seed(seed)


def test_batched_choices_are_exact_for_one_token_and_minus_a_ln_v_for_uniform(tiny_config):
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    one_token = conditional_log_likelihood_batch(model, PROMPT, [[9], [10], [3]], mask_id, num_samples=64)
    logp = torch.log_softmax(model(torch.tensor([PROMPT + [mask_id]]), attention="bidirectional")[0, -1], -1)
    assert [value for value, _ in one_token] == pytest.approx(
        [logp[9].item(), logp[10].item(), logp[3].item()], abs=1e-5
    )
    assert all(stderr == 0 for _, stderr in one_token)
    uniform = conditional_log_likelihood_batch(
        UniformModel(tiny_config.vocab_size), PROMPT, ANSWERS, mask_id, num_samples=10
    )
    assert [value for value, _ in uniform] == pytest.approx(
        [-len(a) * math.log(tiny_config.vocab_size) for a in ANSWERS], rel=1e-6
    )


def test_batched_choices_equal_one_at_a_time_and_are_seeded(tiny_config):
    """Padding to the longest answer (with a key-padding mask) and chunking change nothing."""
    model, mask_id = Transformer(tiny_config).eval(), tiny_config.vocab_size - 1
    batched = conditional_log_likelihood_batch(model, PROMPT, ANSWERS, mask_id, 8, rng(3), rows_per_forward=7)
    generator = rng(3)
    one_at_a_time = [
        conditional_log_likelihood(model, PROMPT, answer, mask_id, 8, generator=generator) for answer in ANSWERS
    ]
    for (value, stderr), (single, single_stderr) in zip(batched, one_at_a_time):
        assert value == pytest.approx(single, abs=1e-4) and stderr == pytest.approx(single_stderr, abs=1e-4)
    assert batched == conditional_log_likelihood_batch(model, PROMPT, ANSWERS, mask_id, 8, rng(3), rows_per_forward=7)
    assert all(value <= 0 for value, _ in batched)
    ar = ar_log_likelihood_batch(model, PROMPT, ANSWERS)
    assert ar == pytest.approx([ar_log_likelihood(model, PROMPT, answer) for answer in ANSWERS], abs=1e-4)


def planted_model(preferred_tokens: list[int], strength: float = 5.0) -> Transformer:
    """A random tiny model whose output prefers `preferred_tokens` everywhere: every embedding carries a
    constant +1 in dimension 0, so the final hidden state does too, and the preferred lm_head rows read it."""
    torch.manual_seed(0)
    model = Transformer(tiny_eval_config())
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[preferred_tokens, 0] = strength
    return model


def write_csv(path, rows: list[dict], columns=("id", "question", "A", "B", "C", "D", "answer")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


QUESTIONS = ["下列哪个是中国的首都？", "哪一项是水果？", "一年有几个季节？", "下面哪个是颜色？"]


def letter_rows(answer: str) -> list[dict]:
    return [
        {"id": i, "question": q, "A": "甲", "B": "乙", "C": "丙", "D": "丁", "answer": answer}
        for i, q in enumerate(QUESTIONS)
    ]


def run_choice(tmp_path, checkpoint, data, *extra):
    return eval_multiple_choice.main(
        ["--checkpoint", checkpoint, "--tokenizer-dir", str(ROOT), "--data", data, "--device", "cpu", *extra]
    )


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_letter_scoring_picks_the_planted_letter(tmp_path, kind):
    (letter_c,) = encode(repo_tokenizer(), "C")
    checkpoint = save_tiny(tmp_path / f"{kind}.pt", kind, planted_model([letter_c]))
    right = write_csv(tmp_path / "right.csv", letter_rows("C"))
    wrong = tmp_path / "wrong.jsonl"  # same questions, answer B: the model still says C, so accuracy must be 0
    wrong.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in letter_rows("B")), encoding="utf-8")
    out = tmp_path / "predictions.jsonl"
    result = run_choice(tmp_path, checkpoint, right, "--data", str(wrong), "--predictions-out", str(out))
    assert result["kind"] == kind
    assert result["summaries"][right]["accuracy"] == 1.0 and result["summaries"][str(wrong)]["accuracy"] == 0.0
    items = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(items) == 8 and all(item["prediction"] == "C" for item in items)
    assert items[0]["source"] == f"{right}:2" and set(items[0]["scores"]) == set("ABCD")
    assert all(item["stderr"]["C"] == 0 for item in items)  # one-token choices: exact, also for diffusion


@pytest.mark.parametrize("kind", ["ar", "diffusion"])
def test_option_scoring_finds_the_planted_text_wherever_it_is(tmp_path, kind):
    tokenizer = repo_tokenizer()
    planted, distractors = "图书馆", ["北京", "老师", "河流"]
    preferred = encode(tokenizer, planted)
    assert not set(preferred) & {t for d in distractors for t in encode(tokenizer, d)}
    checkpoint = save_tiny(tmp_path / f"{kind}.pt", kind, planted_model(preferred))
    rows = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, "ABCD")):
        options = iter(distractors)
        rows.append(
            {
                "id": i,
                "question": question,
                "answer": answer,
                **{letter: planted if letter == answer else next(options) for letter in "ABCD"},
            }
        )
    data = write_csv(tmp_path / "options.csv", rows)
    result = run_choice(
        tmp_path,
        checkpoint,
        data,
        "--continuation",
        "option",
        "--mc-samples",
        "8",
        "--max-forward-tokens",
        "200",
    )
    assert result["summaries"]["all"] == {"items": 4, "accuracy": 1.0, "stderr": 0.0}
    assert [item["prediction"] for item in result["items"]] == list("ABCD")


def test_cmmlu_layout_and_file_errors(tmp_path):
    cmmlu = write_csv(
        tmp_path / "cmmlu.csv",
        [{"": 0, "Question": "问题", "A": "一", "B": "二", "C": "三", "D": "四", "Answer": "d"}],
        columns=("", "Question", "A", "B", "C", "D", "Answer"),
    )
    (question,) = read_questions(cmmlu)
    assert (question.id, question.answer, question.options["D"]) == ("0", "D", "四")
    no_answer = write_csv(
        tmp_path / "no_answer.csv", [{"question": "问题", "A": "一", "B": "二"}], columns=("question", "A", "B")
    )
    with pytest.raises(NanoLladaError, match=r"no_answer.csv:2: no 'answer' field"):
        read_questions(no_answer)
    bad_letter = write_csv(tmp_path / "bad_letter.csv", letter_rows("C")[:1] + letter_rows("E")[:1])
    with pytest.raises(NanoLladaError, match=r"bad_letter.csv:3: answer 'E' is not one of the options A, B, C, D"):
        read_questions(bad_letter)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "A": "a", "B": "b", "answer": "A"}\n{"question": \n', encoding="utf-8")
    with pytest.raises(NanoLladaError, match=r"bad.jsonl:2: malformed JSON"):
        read_questions(bad_json)
    with pytest.raises(NanoLladaError, match=r"missing.csv: multiple-choice file not found"):
        read_questions(tmp_path / "missing.csv")


def test_cli_prints_one_line_errors(tmp_path, capsys):
    checkpoint = save_tiny(tmp_path / "ar.pt", "ar")
    data = write_csv(tmp_path / "bad.csv", letter_rows("Z")[:1])
    argv = ["--checkpoint", checkpoint, "--data", data, "--tokenizer-dir", str(ROOT), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: eval_multiple_choice.main(argv))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.strip().count("\n") == 0
    assert f"{data}:2: answer 'Z' is not one of the options" in stderr
