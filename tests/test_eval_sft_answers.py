"""eval_sft_answers: the gold answer's NLL per token (AR exact, diffusion the exact-count bound) and, with a judge,
the decoded answers' NLL under a fixed AR model, for checkpoints of both routes on the same questions."""

import json
import math

import pytest
import torch
from test_eval_lm import repo_tokenizer, save_tiny
from test_reliability_training import error_line

from model.checkpoint import build_model, read_checkpoint
from model.tokenizer import EOS_ID, chat_text, encode
from scripts.eval import eval_sft_answers

QUESTIONS = [
    ("续写：今天天气很好。", "我们去公园散步，看见很多人在放风筝。"),
    ("续写：会议在北京举行。", "代表们讨论了明年的工作计划。"),
]


def write_questions(path) -> str:
    rows = [
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_answer_nll_of_both_routes_and_the_judged_decodes(tmp_path, capsys):
    ar, diffusion = save_tiny(tmp_path / "ar.pt", "ar"), save_tiny(tmp_path / "diffusion.pt", "diffusion")
    data, out = write_questions(tmp_path / "q.jsonl"), tmp_path / "answers.json"
    argv = ["--tokenizer-dir", ".", "--data", data, "--device", "cpu", "--mc-samples", "4", "--max-new-tokens", "8"]
    results = eval_sft_answers.main(
        [*argv, "--checkpoint", ar, "--checkpoint", diffusion, "--judge", ar, "--json-out", str(out)]
    )
    first, second = results
    tokenizer, model = repo_tokenizer(), build_model(read_checkpoint(ar), ar).eval()
    exact, tokens = 0.0, 0
    for question, answer in QUESTIONS:  # AR: exactly -log p(answer + <|im_end|> | prompt), by a plain forward
        prompt = encode(tokenizer, chat_text(tokenizer, [{"role": "user", "content": question}], True))
        target = [*encode(tokenizer, answer), EOS_ID]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, attention="causal")[0, :-1].float(), -1)
        exact -= sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(target))
        tokens += len(target)
    assert first["tokens"] == second["tokens"] == tokens
    assert first["nll_per_token"] == pytest.approx(exact / tokens, rel=1e-4)
    assert abs(second["nll_per_token"] - math.log(len(tokenizer))) < 1.0  # a random model is near uniform
    assert all(r["mean_answer_tokens"] <= 8 and r["generative_nll_per_token"] > 0 for r in results)
    assert json.loads(out.read_text())["results"][1]["kind"] == "diffusion"
    assert "(upper bound)" in capsys.readouterr().out
    err = error_line(eval_sft_answers.main, [*argv, "--checkpoint", ar, "--judge", diffusion], capsys)
    assert "is a diffusion checkpoint, not ar" in err
