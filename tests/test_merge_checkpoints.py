"""Top-k checkpoint keeping and the weight-averaging merge (LLaDA 2.0 section 3.7 g)."""

import json

import pytest
import torch

from model.checkpoint import read_checkpoint, save_checkpoint
from model.errors import NanoLladaError
from model.transformer import Transformer
from scripts.common.training.topk import TopKCheckpoints, topk_index_path
from scripts.train.merge_checkpoints import main


def constant_model(config, value: float) -> Transformer:
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(value)
    return model


def test_keeper_holds_the_k_lowest_validation_losses(tmp_path, tiny_config):
    keeper = TopKCheckpoints(tmp_path, "run", k=2)
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 4.0), (50, 1.0)]:
        keeper.offer(
            step,
            val,
            lambda path, v=val: save_checkpoint(
                path, "diffusion", tiny_config, constant_model(tiny_config, v), None, step=step, val_loss=v
            ),
        )
    index = json.loads(topk_index_path(tmp_path, "run").read_text())
    assert [(e["step"], e["val_loss"]) for e in index] == [(50, 1.0), (20, 2.0)]
    assert sorted(p.name for p in tmp_path.glob("run_top_step*.pt")) == ["run_top_step20.pt", "run_top_step50.pt"]
    assert TopKCheckpoints(tmp_path, "run", k=2, resume=True).entries == index


def test_merge_averages_the_k_best_weights(tmp_path, tiny_config):
    keeper = TopKCheckpoints(tmp_path, "run", k=3)
    for step, val in [(1, 0.5), (2, 0.7), (3, 0.6)]:
        keeper.offer(
            step,
            val,
            lambda path, v=val: save_checkpoint(
                path,
                "diffusion",
                tiny_config,
                constant_model(tiny_config, v),
                {"vocab_size": 101, "sha256": "x"},
                step=step,
                val_loss=v,
            ),
        )
    out = main(["--run-name", "run", "--save-dir", str(tmp_path), "--k", "2"])
    merged = read_checkpoint(out["path"])
    assert [e["step"] for e in merged.extra["merged_from"]] == [1, 3]
    assert merged.kind == "diffusion" and merged.config == tiny_config
    assert all(torch.allclose(t, torch.full_like(t, 0.55)) for t in merged.state_dict.values())
    explicit = main(
        [
            "--run-name",
            "picked",
            "--save-dir",
            str(tmp_path),
            "--k",
            "5",
            "--checkpoints",
            str(tmp_path / "run_top_step1.pt"),
            str(tmp_path / "run_top_step2.pt"),
        ]
    )
    assert all(
        torch.allclose(t, torch.full_like(t, 0.6)) for t in read_checkpoint(explicit["path"]).state_dict.values()
    )


def test_merge_explains_missing_inputs(tmp_path, tiny_config):
    with pytest.raises(NanoLladaError, match="--keep-top-k"):
        main(["--run-name", "none", "--save-dir", str(tmp_path)])
    save_checkpoint(tmp_path / "plain.pt", "diffusion", tiny_config, Transformer(tiny_config), None)
    with pytest.raises(NanoLladaError, match="no val_loss"):
        main(["--run-name", "x", "--save-dir", str(tmp_path), "--checkpoints", str(tmp_path / "plain.pt")])
    save_checkpoint(tmp_path / "a.pt", "diffusion", tiny_config, Transformer(tiny_config), None, val_loss=1.0)
    save_checkpoint(tmp_path / "b.pt", "ar", tiny_config, Transformer(tiny_config), None, val_loss=2.0)
    with pytest.raises(NanoLladaError, match="differs"):
        main(
            [
                "--run-name",
                "x",
                "--save-dir",
                str(tmp_path),
                "--checkpoints",
                str(tmp_path / "a.pt"),
                str(tmp_path / "b.pt"),
            ]
        )
