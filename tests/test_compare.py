"""scripts.eval.compare: table, numbers and figures for two tiny checkpoints with metrics files."""

import json

from conftest import ROOT
from test_eval_lm import save_tiny, write_corpus
from test_multiple_choice import letter_rows, write_csv

from scripts.eval import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, val_losses):
    records = [{"step": step, "val_loss": loss} for step, loss in val_losses] + [{"step": 1, "loss": 9.5, "lr": 1e-3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def run_compare(tmp_path, checkpoints: list[str], out, *flags: str) -> dict:
    """scripts.eval.compare on a small held-out corpus, 32-token rows, one batch."""
    argv = [flag for checkpoint in checkpoints for flag in ("--checkpoint", checkpoint)]
    corpus = write_corpus(tmp_path / "val.jsonl")
    argv += ["--tokenizer-dir", str(ROOT), "--device", "cpu", "--eval-data", corpus, "--seq-len", "32"]
    return compare.main([*argv, "--eval-max-batches", "1", "--out", str(out), *flags])


def test_compare_writes_table_numbers_and_figures(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    ar = save_tiny(weights / "pretrain_ar.pt", "ar")
    diffusion = save_tiny(weights / "diffusion_from_ar_best.pt", "diffusion")  # run name drops _best
    write_metrics(weights / "pretrain_ar_metrics.jsonl", [(0, 8.8), (10, 7.5), (20, 7.0)])
    write_metrics(weights / "diffusion_from_ar_metrics.jsonl", [(0, 9.0), (10, 8.1)])
    out = tmp_path / "report"
    result = run_compare(
        tmp_path,
        [ar, diffusion],
        out,
        "--eval-batch-size",
        "4",
        "--mc-samples",
        "2",
        "--data",
        write_csv(tmp_path / "mc.csv", letter_rows("A")[:2]),
    )
    table = (out / "comparison.md").read_text(encoding="utf-8")
    for expected in (
        ar,
        diffusion,
        "| ar |",
        "| diffusion |",
        "validation_curves.png",
        "lm_nll.png",
        "## Multiple choice",
        "diffusion_from_ar_metrics.jsonl",
    ):
        assert expected in table
    assert table.count("\n| ") >= 2 + 2 + 2  # LM, multiple-choice and curve tables each have two data rows
    for figure in ("validation_curves.png", "lm_nll.png"):
        assert (out / figure).read_bytes()[:8] == PNG_MAGIC
    numbers = json.loads((out / "comparison.json").read_text(encoding="utf-8"))["results"]
    assert [r["run"] for r in numbers] == ["pretrain_ar", "diffusion_from_ar"]
    assert numbers[0]["final_val_loss"] == 7.0 and numbers[1]["final_val_loss"] == 8.1
    assert numbers[0]["row_tokens"] == numbers[1]["row_tokens"] and numbers[1]["choice"]["items"] == 2
    assert result["out"] == str(out)


def test_compare_notes_runs_without_metrics(tmp_path):
    ar = save_tiny(tmp_path / "lonely.pt", "ar")
    run_compare(tmp_path, [ar], tmp_path / "out", "--eval-batch-size", "2")
    table = (tmp_path / "out" / "comparison.md").read_text(encoding="utf-8")
    assert "No validation records in" in table and "lonely_metrics.jsonl" in table
    assert not (tmp_path / "out" / "validation_curves.png").exists() and (tmp_path / "out" / "lm_nll.png").exists()
