"""scripts.bench end to end: the --tiny smoke run is labelled as such, a checkpoint pair gives a card with every figure,
and pairs that cannot be compared are refused. No timing is asserted."""

import json
import math
import numbers

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.errors import NanoLladaError
from model.transformer import Transformer
from scripts.bench import main
from scripts.common.bench.training import training_flops_per_token

SPEED = ("seconds", "content_tokens_per_s", "first_token_seconds", "forward_passes", "tokens_per_forward")


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_smoke_run_is_labelled_and_writes_every_figure(tmp_path):
    out = tmp_path / "smoke.json"
    main(["--device", "cpu", "--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke_test"] is True and report["device_type"] == "cpu" and report["torch"]
    assert "commit" in report["git"] and report["training_settings"]["preset"] == "tiny"
    for route in ("ar", "diffusion"):
        figures = report["training"][route]
        assert all(is_number(figures[k]) for k in ("tokens_per_s", "step_seconds", "achieved_tflops"))
        assert figures["mfu"] is None and figures["peak_memory_gib"] is None  # CPU: no bf16 peak, no CUDA memory stats
    rows, settings = report["card"]["rows"], report["card_settings"]
    workloads = {(r["workload"], r["gen_length"]) for r in rows}
    assert workloads == {("continuation", n) for n in settings["continuation_lengths"]} | {("classification", 8)}
    for row in rows:
        assert all(is_number(row[k]) for k in SPEED) and row["content_tokens"] <= row["prompts"] * row["gen_length"]
        assert (
            row["speed_vs_ar"] == pytest.approx(1.0) if row["mode"] == "ar_kv_cache" else is_number(row["speed_vs_ar"])
        )
        if row["mode"] == "llada_baseline" and row["content_tokens"]:
            assert row["perplexity_vs_baseline"] == 1
    assert {r["batch"] for r in rows} == set(settings["batches"])
    table = out.with_suffix(".md").read_text()
    assert "Smoke run" in table and "never quote it" in table and "## Goal" not in table and "fast_0.9" in table
    assert out.with_suffix(".png").exists()


def save_tiny(path, kind: str, hidden: int = 64) -> str:
    config = preset("tiny", hidden_size=hidden)
    save_checkpoint(path, kind, config, Transformer(config), None)
    return str(path)


def test_a_checkpoint_pair_gives_a_card_with_the_goal(tmp_path):
    data = tmp_path / "val.jsonl"
    text = "人民日报报道，北京市今天召开会议，讨论经济发展和社会建设问题。" * 6
    data.write_text((json.dumps({"text": text}) + "\n") * 3, encoding="utf-8")
    out = tmp_path / "card.json"
    pair = [
        "--checkpoint",
        save_tiny(tmp_path / "ar.pt", "ar"),
        "--checkpoint",
        save_tiny(tmp_path / "d.pt", "diffusion"),
    ]
    args = ["--device", "cpu", "--continuation-data", str(data), "--prompts", "2", "--lengths", "32", "--batches", "1"]
    report = main([*pair, *args, "--thresholds", "0.9", "--speculative", "4", "--skip-training", "--out", str(out)])
    assert report["smoke_test"] is False and report["training"] == {}
    assert report["card"]["goal"]["gen_length"] == 32 and isinstance(report["card"]["goal"]["met"], bool)
    assert {r["mode"] for r in report["card"]["rows"]} >= {
        "ar_kv_cache",
        "llada_baseline",
        "fast_0.9",
        "speculative_k4",
    }
    speculative = next(r for r in report["card"]["rows"] if r["mode"] == "speculative_k4")
    assert all(is_number(speculative[k]) for k in SPEED)
    assert "## Goal" in out.with_suffix(".md").read_text()


def test_pairs_that_cannot_be_compared_are_refused(tmp_path):
    ar, other_ar = save_tiny(tmp_path / "a.pt", "ar"), save_tiny(tmp_path / "b.pt", "ar")
    wide = save_tiny(tmp_path / "w.pt", "diffusion", hidden=128)
    with pytest.raises(NanoLladaError, match="not one AR and one diffusion"):
        main(["--device", "cpu", "--checkpoint", ar, "--checkpoint", other_ar, "--skip-training"])
    with pytest.raises(NanoLladaError, match="differ in hidden_size 64 vs 128"):
        main(["--device", "cpu", "--checkpoint", ar, "--checkpoint", wide, "--skip-training"])
    with pytest.raises(NanoLladaError, match="give two checkpoints"):
        main(["--device", "cpu", "--checkpoint", ar, "--skip-training"])


def test_training_flops_follow_six_n_plus_attention():
    """Counted from the built model, not from the formula: 6 FLOPs per weight of every matmul (the tied head's
    padded rows included), and per layer QK^T and AV, 2 x 2 x hidden x seq forward, three times that with the
    backward."""
    for name, seq in [("minimind2_small", 256), ("tiny", 64)]:
        config = preset(name)
        model = Transformer(config)
        matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        attention = 3 * 2 * 2 * config.hidden_size * seq * config.num_hidden_layers
        assert training_flops_per_token(config, seq) == 6 * matmul_weights + attention


def test_a_list_flag_that_is_not_a_list_is_one_line_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", "--device", "cpu", "--lengths", "32,x"])
    err = capsys.readouterr().err
    assert "--lengths" in err and "expected comma-separated ints, got '32,x'" in err
