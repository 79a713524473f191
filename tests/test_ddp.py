"""Data-parallel training: 2 gloo processes under torchrun train like 1 process on the same global batch,
and a 2-process run resumes with 1 process.

Tolerance: the runs differ only in fp32 summation order (each rank sums its rows' loss, DDP sums the two
gradients; one process sums all rows at once), ~1e-7 relative per operation. Adam divides by sqrt(v), so
gradient rounding passes into the updates at the same relative size, except for elements whose gradient is
itself near rounding level, where m/sqrt(v) can move by a fraction of the learning rate (3e-3). Measured over
8 steps: losses agree to ~1e-6 relative, weights to <= 3e-6 absolute. rtol 1e-4 and atol 1e-5 (lr/300) leave
margin while failing on any real mistake (a missing or doubled gradient, a wrong row split or loss weight
moves the loss by >= 1e-2 relative and weights by ~lr).

This file is also the worker: `torchrun --nproc-per-node 2 tests/test_ddp.py OUT_DIR MAX_STEPS`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import TINY_TRAINING  # noqa: E402

from model.checkpoint import read_checkpoint  # noqa: E402
from model.config import preset  # noqa: E402
from model.errors import NanoLladaError  # noqa: E402
from model.objectives.ar_loss import next_token_loss  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from scripts.common.training.distributed import shard  # noqa: E402
from scripts.common.training.optimization import TrainConfig  # noqa: E402
from scripts.common.training.trainer import RunOptions, Task, train  # noqa: E402

CONFIG = preset("tiny", vocab_size=101, max_position_embeddings=256)
ROWS = 5  # an odd global batch: the two ranks get 3 and 2 rows, so the per-rank loss weights matter


def data(k):
    return torch.randint(0, 101, (ROWS, 16), generator=torch.Generator().manual_seed(k))


def run(out_dir, max_steps: int, resume: bool = False) -> dict:
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    cfg = TrainConfig("run", "ar", max_steps=max_steps, out_dir=str(out_dir), lr_schedule="constant", **TINY_TRAINING)
    gen = torch.Generator().manual_seed(9)
    val = [torch.randint(0, 101, (4, 16), generator=gen) for _ in range(3)]  # 3 batches: ranks score 2 and 1
    task = Task(data, val, loss, loss)
    return train(model, cfg, task, RunOptions({"vocab_size": 101, "sha256": "t"}, resume), torch.device("cpu"))


def loss(model, rows, rng, step=None):
    return next_token_loss(model, rows)


def metrics(out_dir) -> tuple[dict, dict]:
    records = [json.loads(line) for line in (Path(out_dir) / "run_metrics.jsonl").read_text().splitlines()]
    return (
        {r["step"]: r["loss"] for r in records if "loss" in r},
        {r["step"]: r["val_loss"] for r in records if "val_loss" in r},
    )


def launch(out_dir, max_steps: int, nproc: int = 2) -> list[subprocess.Popen]:
    """Start `nproc` workers with the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Equivalent to `torchrun --nproc-per-node 2 tests/test_ddp.py ...` minus its agent process, whose own torch
    import costs seconds on a 2-core test machine (most of this test's time is the workers' imports).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
    }
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(out_dir), str(max_steps)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(nproc)
    ]


def wait(workers: list[subprocess.Popen]) -> None:
    try:
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(o[-3000:] for o in outputs)


def test_shard_covers_every_row_once():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    parts = [shard((7, batch), r, 2) for r in range(2)]
    assert [p[0] for p in parts] == [7, 7]  # non-tensor values stay whole
    assert torch.equal(torch.cat([p[1]["input_ids"] for p in parts]), batch["input_ids"])
    assert [len(p[1]["labels"]) for p in parts] == [3, 2]


@pytest.fixture
def one_thread():
    """Like the workers (OMP_NUM_THREADS=1): on a busy 2-core machine, 2 spinning OpenMP threads run 10-30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_match_one_and_resume_with_one(tmp_path, one_thread):
    workers = launch(tmp_path / "ddp", max_steps=4)
    try:
        run(tmp_path / "single", max_steps=8)  # while the workers import torch
    finally:
        wait(workers)
    single_losses, single_val = metrics(tmp_path / "single")
    single_weights = read_checkpoint(tmp_path / "single" / "run.pt").state_dict
    ddp_losses, ddp_val = metrics(tmp_path / "ddp")
    assert sorted(ddp_losses) == [1, 2, 3, 4] and sorted(ddp_val) == [0, 3, 4]  # one metrics file, written once
    for step, loss in ddp_losses.items():  # the all-reduced loss of the global batch, step by step
        assert abs(loss - single_losses[step]) <= 1e-4 * abs(single_losses[step]), (step, loss, single_losses[step])
    assert abs(ddp_val[3] - single_val[3]) <= 1e-4 * single_val[3]
    assert read_checkpoint(tmp_path / "ddp" / "run.pt").extra["world_size"] == 2

    summary = run(tmp_path / "ddp", max_steps=8, resume=True)  # 1 process continues at global step 4
    assert summary["step"] == 8
    resumed_losses, _ = metrics(tmp_path / "ddp")
    assert sorted(resumed_losses) == list(range(1, 9))
    resumed = read_checkpoint(tmp_path / "ddp" / "run.pt").state_dict
    for name, value in single_weights.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":  # torchrun worker
    run(sys.argv[1], int(sys.argv[2]))


def test_only_rank_zero_prints_through_the_entry_point_wrapper(monkeypatch, capsys):
    from scripts.common.cli import run_main

    for rank, expected in (("0", "hello from the entry point\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        run_main(lambda: print("hello from the entry point"))
        assert capsys.readouterr().out == expected
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: (_ for _ in ()).throw(NanoLladaError("bad flag")))
    assert exit_info.value.code == 2 and "error: bad flag" in capsys.readouterr().err  # errors still reach stderr
