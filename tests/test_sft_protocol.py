"""The SFT objective protocol (scripts/common/experiments/sft_objectives.py): every objective's flags parse into the
objective they name, whatever the trainer's defaults, and the summary's means and standard errors are those of the
runs."""

import argparse
import math
from pathlib import Path

import pytest

from scripts.common.experiments import sft_objectives as sft_protocol
from scripts.train import train_sft_diffusion, train_sft_minimind


def settings(tmp_path: Path) -> sft_protocol.ProtocolSettings:
    return sft_protocol.ProtocolSettings(out_dir=tmp_path, data=tmp_path)


@pytest.mark.parametrize("objective", [name for name in sft_protocol.OBJECTIVES if name != "ar"])
def test_each_objective_sets_every_objective_flag_explicitly(tmp_path, objective):
    module, argv = sft_protocol.sft_argv(settings(tmp_path), tmp_path, "reviews", objective, seed=3)
    args = train_sft_diffusion.parse_args(argv)
    assert module == "scripts.train.train_sft_diffusion" and args.seed == 3 and args.eos_padding_length == 5
    explicit = {flag.lstrip("-").replace("-", "_") for flag in argv if flag.startswith("--")}
    assert {"mask_draw", "all_masked_share", "late_time_share", "eos_padding_weight", "iid_mask_eps"} <= explicit
    assert "denoising_weight" in explicit and args.prompt_causal is not None  # on or off, never the default
    assert args.prompt_causal == objective.startswith("prompt_causal")
    if objective == "mixture":
        assert args.all_masked_share == 0.5 and args.mask_draw == "time"
    if objective == "band":
        assert (args.mask_ratio_min, args.mask_ratio_max, args.eos_padding_weight) == (0.998, 0.999, 0)


def test_the_ar_yardstick_runs_ar_sft_from_the_ar_model(tmp_path):
    module, argv = sft_protocol.sft_argv(settings(tmp_path), tmp_path, "continuation", "ar", seed=0)
    assert module == "scripts.train.train_sft_minimind" and train_sft_minimind.parse_args(argv).max_steps == 150
    assert str(tmp_path / "ar_state_dict.pt") in argv and str(tmp_path / "sample_continuation_train.jsonl") in argv


def test_report_experiments_flags_become_the_protocols_settings():
    args = argparse.Namespace(out_dir="w", data_dir="d", device="cpu", sft_steps=None, questions=200, seeds=5, jobs=2,
                              objectives="ar,mixture")  # fmt: skip
    made = sft_protocol.ProtocolSettings.from_args(args)
    assert (made.out_dir, made.sft_steps, made.objectives, made.jobs) == (Path("w/sft"), 150, ("ar", "mixture"), 2)


def test_the_summary_is_the_mean_and_standard_error_over_seeds():
    runs = [
        {"task": "reviews", "objective": "x", "seed": s, "accuracy": a, "likelihood_accuracy": 0.5, "label_share": None,
         "questions": 200, "decoded_labels": {"正面": p, "负面": 200 - p}}
        for s, (a, p) in enumerate([(0.7, 100), (0.8, 190), (0.6, 120)])
    ]  # fmt: skip
    row = sft_protocol.summary(runs)["reviews"]["x"]
    assert row["accuracy"]["mean"] == pytest.approx(0.7) and row["accuracy"]["n"] == 3
    assert row["accuracy"]["stderr"] == pytest.approx(0.1 / math.sqrt(3))
    assert row["most_one_label"] == pytest.approx(0.95) and "label_share" not in row
