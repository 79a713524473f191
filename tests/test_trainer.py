"""The shared training loop: LR schedules, resume equals an uninterrupted run, files written, metrics kept."""

import io
import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_TRAINING

from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from model.objectives.ar_loss import next_token_loss
from model.objectives.diffusion_loss import diffusion_loss
from model.transformer import Transformer
from scripts.common.training import trainer
from scripts.common.training.optimization import TrainConfig, lr_at
from scripts.common.training.trainer import RunOptions, Task, train

DEVICE = torch.device("cpu")
TOKENIZER = {"vocab_size": 101, "sha256": "t"}


def test_lr_schedules():
    cos = TrainConfig("r", "ar", max_steps=100, learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == pytest.approx(1.0) and lr_at(100, cos) == pytest.approx(0.1)
    assert all(lr_at(s, cos) >= lr_at(s + 1, cos) for s in range(10, 100))
    wsd = replace(cos, lr_schedule="wsd", lr_stable_ratio=0.4, min_lr_ratio=0.0)
    assert lr_at(49, wsd) == 1.0 and lr_at(75, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0


def make_run(tmp_path, tiny_config, batch_fn, name="run", max_steps=8):
    torch.manual_seed(0)
    model = Transformer(tiny_config)
    cfg = TrainConfig(name, "ar", max_steps=max_steps, out_dir=str(tmp_path), **TINY_TRAINING)
    val = [torch.randint(0, tiny_config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(9))]
    return model, cfg, val


def data(k):
    return torch.randint(0, 101, (4, 16), generator=torch.Generator().manual_seed(k))


def loss_fn(model, batch, rng, step=None):
    return next_token_loss(model, batch)


def run_train(model, cfg, val, batch_fn=data, loss=loss_fn, resume=False, tokenizer=TOKENIZER) -> dict:
    return train(model, cfg, Task(batch_fn, val, loss, loss_fn), RunOptions(tokenizer, resume), DEVICE)


def diffusion_loss_fn(model, batch, rng, step=None):
    return diffusion_loss(model, batch, rng, mask_id=100)


@pytest.mark.parametrize("loss", [loss_fn, diffusion_loss_fn], ids=["ar", "diffusion"])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_config, loss):
    """The diffusion loss draws its masks from the step's generator: a resumed run must draw the same ones."""
    model, cfg, val = make_run(tmp_path / "a", tiny_config, data)
    run_train(model, cfg, val, loss=loss)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupt_at_step_5(k):
        if k == 5 * cfg.accumulation_steps + 1:  # in the middle of step 6's accumulation
            raise KeyboardInterrupt
        return data(k)

    model, cfg, val = make_run(tmp_path / "b", tiny_config, data)
    with pytest.raises(KeyboardInterrupt):
        run_train(model, cfg, val, batch_fn=interrupt_at_step_5, loss=loss)
    assert read_checkpoint(tmp_path / "b" / "run.pt").extra["step"] == 5
    model, cfg, val = make_run(tmp_path / "b", tiny_config, data)  # a fresh process: new model, same flags
    summary = run_train(model, cfg, val, loss=loss, resume=True)
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
    summary = run_train(model, cfg, val)
    for name in ("run.pt", "run_state_dict.pt", "run_best.pt", "run_metrics.jsonl", "run_loss.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["best_step"] > 0
    assert "optimizer" not in read_checkpoint(tmp_path / "run_state_dict.pt").extra
    model, cfg, val = make_run(tmp_path, tiny_config, data)
    with pytest.raises(NanoLladaError, match="already exists; pass --resume"):
        run_train(model, cfg, val, tokenizer={})
    model, cfg, val = make_run(tmp_path / "none", tiny_config, data)
    with pytest.raises(NanoLladaError, match="--resume: .* not found"):
        run_train(model, cfg, val, resume=True, tokenizer={})


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_lines_are_readable_while_the_run_is_alive_and_after_it_fails(tmp_path, tiny_config):
    seen = {}

    def loss_reading_the_metrics(model, batch, rng, step):
        if step == 5:  # steps 1-4 are done and logged (every 2 steps); the run is still going
            seen["steps"] = [r["step"] for r in records(tmp_path / "run_metrics.jsonl") if "loss" in r]
        if step == 7:
            raise RuntimeError("the data went bad")
        return loss_fn(model, batch, rng)

    model, cfg, val = make_run(tmp_path, tiny_config, data)
    with pytest.raises(RuntimeError, match="the data went bad"):
        run_train(model, cfg, val, loss=loss_reading_the_metrics)
    assert seen["steps"] == [1, 2, 3, 4]
    kept = records(tmp_path / "run_metrics.jsonl")  # every line whole after the failure
    assert [r["step"] for r in kept if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in kept if "val_loss" in r] == [0, 3, 6]


def test_a_resumed_run_keeps_the_metrics_before_its_checkpoint(tmp_path, tiny_config):
    def crash_in_step_4(model, batch, rng, step):
        if step == 3:  # after the checkpoint of step 3, before the next log line (step 4)
            raise RuntimeError("killed")
        return loss_fn(model, batch, rng)

    model, cfg, val = make_run(tmp_path, tiny_config, data)
    cfg.save_interval = 3  # not a multiple of log_interval: step 3's loss is logged with its checkpoint
    with pytest.raises(RuntimeError, match="killed"):
        run_train(model, cfg, val, loss=crash_in_step_4)
    with open(tmp_path / "run_metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "lo')  # a line cut short by a killed process
    model, cfg, val = make_run(tmp_path, tiny_config, data)
    cfg.save_interval = 3
    run_train(model, cfg, val, resume=True)
    kept = records(tmp_path / "run_metrics.jsonl")
    assert [r["step"] for r in kept if "loss" in r] == list(range(1, 9))  # the whole run, each step once
    assert [r["step"] for r in kept if "val_loss" in r] == [0, 3, 6, 8]


def test_prefetcher_returns_batch_k_builds_ahead_and_raises_where_asked():
    from scripts.common.training.prefetch import Prefetcher, pin

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


def test_the_progress_bar_and_the_logged_losses_follow_every_optimizer_step(tmp_path, tiny_config, monkeypatch):
    bars, micro_losses = [], []

    class Recorded(trainer.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)

    def recorded_loss(model, batch, rng, step=None):
        loss = next_token_loss(model, batch)
        micro_losses.append(loss.item())
        return loss, {"at": step}

    monkeypatch.setattr(trainer, "tqdm", Recorded)
    model, cfg, val = make_run(tmp_path, tiny_config, data, max_steps=4)
    run_train(model, cfg, val, loss=recorded_loss)
    assert len(bars) == 1 and bars[0].n == bars[0].total == 4
    assert "at=3" in bars[0].postfix  # the last step's info, at the end of a two-step log window
    logged = [r["loss"] for r in records(tmp_path / "run_metrics.jsonl") if "loss" in r]
    per_step = torch.tensor(micro_losses).view(4, cfg.accumulation_steps).mean(1)  # the mean over micro-batches
    assert torch.allclose(torch.tensor(logged), per_step, atol=1e-5)


def test_two_accumulated_micro_batches_make_the_clipped_step_of_their_concatenation(tmp_path, tiny_config, monkeypatch):
    # Equal token counts: the mean of two micro-batch means is the mean over both, so after every step the weights
    # equal those of a run without accumulation on the concatenated batches. Each step clips at grad_clip (1.0).
    clipped_at, clip = [], torch.nn.utils.clip_grad_norm_

    def recorded_clip(parameters, max_norm):
        clipped_at.append(max_norm)
        return clip(parameters, max_norm)

    def concatenated(k):
        return torch.cat([data(2 * k), data(2 * k + 1)])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    accumulated, cfg, val = make_run(tmp_path / "a", tiny_config, data, max_steps=2)
    assert cfg.accumulation_steps == 2 and cfg.grad_clip == 1.0
    run_train(accumulated, cfg, val)
    assert clipped_at == [1.0, 1.0]
    whole, cfg, val = make_run(tmp_path / "b", tiny_config, concatenated, max_steps=2)
    run_train(whole, replace(cfg, accumulation_steps=1), val, batch_fn=concatenated)
    for (name, a), b in zip(accumulated.state_dict().items(), whole.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_early_stopping_ends_the_run_at_the_first_eval_without_improvement(tmp_path, tiny_config):
    def flat_val_loss(model, batch, rng):
        return torch.tensor(1.0)  # the same at every evaluation

    model, cfg, val = make_run(tmp_path, tiny_config, data, max_steps=12)
    cfg = replace(cfg, early_stop_patience=1)  # evaluations every 3 steps; the step-0 one is not a best
    summary = train(model, cfg, Task(data, val, loss_fn, flat_val_loss), RunOptions(TOKENIZER), DEVICE)
    assert summary["stopped_early"] and summary["step"] == 6 and summary["best_step"] == 3
