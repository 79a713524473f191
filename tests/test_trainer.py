"""The shared training loop: LR schedules, resume equals an uninterrupted run, files written."""

import json

import pytest
import torch

from model.ar import next_token_loss
from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from model.transformer import Transformer
from scripts.common.trainer import TrainConfig, lr_at, train

DEVICE = torch.device("cpu")


def test_lr_schedules():
    cos = TrainConfig("r", "ar", max_steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == pytest.approx(1.0) and lr_at(100, cos) == pytest.approx(0.1)
    assert all(lr_at(s, cos) >= lr_at(s + 1, cos) for s in range(10, 100))
    wsd = TrainConfig(
        "r",
        "ar",
        max_steps=100,
        learning_rate=1.0,
        warmup_steps=10,
        lr_stable_ratio=0.4,
        min_lr_ratio=0.0,
        lr_schedule="wsd",
    )
    assert lr_at(49, wsd) == 1.0 and lr_at(75, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0


def make_run(tmp_path, tiny_config, batch_fn, name="run", max_steps=8):
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    cfg = TrainConfig(
        name,
        "ar",
        max_steps=max_steps,
        out_dir=str(tmp_path),
        learning_rate=3e-3,
        warmup_steps=2,
        accumulation_steps=2,
        eval_interval=3,
        save_interval=100,
        log_interval=2,
    )
    val = [torch.randint(0, tiny_config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))]
    return model, cfg, val


def data(k):
    return torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(k))


def loss_fn(model, batch, rng):
    return next_token_loss(model, batch)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_config):
    model, cfg, val = make_run(tmp_path / "a", tiny_config, data)
    train(model, tiny_config, cfg, data, val, loss_fn, {"vocab_size": 101, "sha256": "t"}, DEVICE)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupt_at_step_5(k):
        if k == 5 * cfg.accumulation_steps + 1:  # in the middle of step 6's accumulation
            raise KeyboardInterrupt
        return data(k)

    model, cfg, val = make_run(tmp_path / "b", tiny_config, data)
    with pytest.raises(KeyboardInterrupt):
        train(model, tiny_config, cfg, interrupt_at_step_5, val, loss_fn, {"vocab_size": 101, "sha256": "t"}, DEVICE)
    assert read_checkpoint(tmp_path / "b" / "run.pt").extra["step"] == 5
    model, cfg, val = make_run(tmp_path / "b", tiny_config, data)  # a fresh process: new model, same flags
    summary = train(
        model, tiny_config, cfg, data, val, loss_fn, {"vocab_size": 101, "sha256": "t"}, DEVICE, resume=True
    )
    assert summary["step"] == 8
    assert all(torch.equal(uninterrupted[k], v) for k, v in model.state_dict().items())
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "run_metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, 9))  # no duplicated or missing steps across the resume


def test_run_writes_every_file_and_refuses_to_overwrite(tmp_path, tiny_config):
    model, cfg, val = make_run(tmp_path, tiny_config, data)
    summary = train(model, tiny_config, cfg, data, val, loss_fn, {"vocab_size": 101, "sha256": "t"}, DEVICE)
    for name in ("run.pt", "run_state_dict.pt", "run_best.pt", "run_metrics.jsonl", "run_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["best_step"] > 0
    assert "optimizer" not in read_checkpoint(tmp_path / "run_state_dict.pt").extra
    model, cfg, val = make_run(tmp_path, tiny_config, data)
    with pytest.raises(NanoLladaError, match="already exists; pass --resume"):
        train(model, tiny_config, cfg, data, val, loss_fn, {}, DEVICE)
    model, cfg, val = make_run(tmp_path / "none", tiny_config, data)
    with pytest.raises(NanoLladaError, match="--resume: .* not found"):
        train(model, tiny_config, cfg, data, val, loss_fn, {}, DEVICE, resume=True)


def test_prefetcher_returns_batch_k_builds_ahead_and_raises_where_asked():
    from scripts.common.prefetch import Prefetcher, pin

    built = []

    def batch_fn(k):
        built.append(k)
        if k == 5:
            raise NanoLladaError("bad batch 5")
        return {"ids": torch.full((2, 3), k), "pair": (torch.tensor([k]), "tag")}

    prefetcher = Prefetcher(batch_fn, stop=6, depth=2)
    try:
        assert prefetcher.get(2)["ids"].eq(2).all()  # a resumed run starts anywhere
        assert sorted(prefetcher.pending) == [3, 4]  # the next two are on their way
        assert [int(prefetcher.get(k)["pair"][0]) for k in (3, 4)] == [3, 4]
        with pytest.raises(NanoLladaError, match="bad batch 5"):
            prefetcher.get(5)
    finally:
        prefetcher.close()
    assert max(built) == 5 and sorted(built) == [2, 3, 4, 5]  # nothing at or past `stop` was built
    assert pin({"a": (3, ["x"])}) == {"a": (3, ["x"])}  # containers are rebuilt, non-tensors kept (pinning needs CUDA)
