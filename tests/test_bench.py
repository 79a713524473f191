"""The benchmark's CPU smoke test runs end to end and writes every figure; no timing is asserted."""

import json
import math
import numbers

from model.config import preset
from scripts.bench import main, training_flops_per_token


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_cpu_benchmark_writes_json_and_markdown_with_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["smoke_test"] is True and report["device_type"] == "cpu" and report["torch"]
    assert "commit" in report["git"] and report["settings"]["preset"] == "tiny"
    for route in ("ar", "diffusion"):
        figures = report["training"][route]
        assert all(is_number(figures[k]) for k in ("tokens_per_s", "step_seconds", "achieved_tflops"))
        assert figures["mfu"] is None and figures["peak_memory_gib"] is None  # CPU: no bf16 peak, no CUDA memory stats
    assert is_number(report["training"]["diffusion_vs_ar"])
    modes = {"ar_kv_cache", "llada_baseline", "threshold", "threshold_prefix_cache", "threshold_dual_cache"}
    settings = report["settings"]
    assert len(report["decoding"]) == len(modes) * len(settings["gen_lengths"]) * len(settings["decode_batches"])
    for row in report["decoding"]:
        assert row["mode"] in modes
        assert all(
            is_number(row[k])
            for k in ("seconds", "tokens_per_s", "nfe", "tokens_per_forward", "speedup_vs_baseline", "speed_vs_ar")
        )
        assert 1 <= row["nfe"] <= row["gen_length"] and row["tokens_per_forward"] == row["gen_length"] / row["nfe"]
        if row["mode"] == "ar_kv_cache":
            assert row["agreement_with_baseline"] is None
        else:
            assert 0 <= row["agreement_with_baseline"] <= 1
        if row["mode"] == "llada_baseline":
            assert row["agreement_with_baseline"] == 1 and row["nfe"] == row["gen_length"]
    table = out.with_suffix(".md").read_text()
    assert "Smoke test" in table and "threshold_dual_cache" in table and "| ar |" in table


def test_training_flops_follow_six_n_plus_attention():
    config = preset("minimind2_small")
    h, layers = config.hidden_size, config.num_hidden_layers
    weights = (training_flops_per_token(config, 256) - 12 * layers * h * 256) / 6
    assert (
        weights == layers * (2 * h * h + 2 * h * 128 + 3 * h * config.intermediate_size) + config.padded_vocab_size * h
    )  # the head computes padded rows too


def test_a_block_trained_checkpoint_is_refused_with_the_script_to_use(tmp_path):
    import pytest

    from model.checkpoint import save_checkpoint
    from model.errors import NanoLladaError
    from model.transformer import Transformer

    path = tmp_path / "blk.pt"
    save_checkpoint(
        path, "diffusion", preset("tiny"), Transformer(preset("tiny")), None, block_diffusion={"block_size": 8}
    )
    with pytest.raises(NanoLladaError, match="block diffusion .block 8.*eval_diffusion"):
        main(["--device", "cpu", "--skip-training", "--checkpoint", str(path), "--out", str(tmp_path / "b.json")])
