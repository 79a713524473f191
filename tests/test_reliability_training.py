"""Faults and bad input on the training side, as a user meets them: every one ends in one true line.

Classes: changed shape flags on --resume; Ctrl-C messages that say what was saved; no temp file beside the data
after a data error or an interrupt; file-system errors; NaN/infinite flags and unknown devices; messages that name
the real cause (one document, prompts longer than --max-seq-len, --skip-bad-lines only where it exists, content
that is not a string).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from tqdm import tqdm

from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from model.tokenizer import load_tokenizer
from scripts.common.cli import pick_device, run_main
from scripts.common.data import packing
from scripts.common.data import sft as sft_data
from scripts.common.data.readers import iter_conversations
from scripts.common.pipeline import cli
from scripts.common.training import trainer
from scripts.train import diffusion, train_pretrain, train_sft_minimind

TRAIN = [*cli(**TINY_MODEL, device="cpu", tokenizer_dir="."), *cli(seq_len=32, batch_size=4, eval_batches=1)]
TRAIN += cli(warmup_steps=1, eval_interval=100, save_interval=100, log_interval=1, max_iters=2)


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    """Progress bars write to stderr too; without them, stderr is exactly what a user reads once the bar is gone."""
    for module in (packing, sft_data, trainer):
        monkeypatch.setattr(module, "tqdm", lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True}))


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def turns(question: str, answer: str) -> dict:
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    texts = [{"text": f"第{i}篇：今天天气很好，我们去公园散步，看到了{i}只小鸟在树上唱歌。"} for i in range(120)]
    sft = [turns(f"问题{i}：一加{i}等于几？", f"答案是{i + 1}。") for i in range(40)]
    return {"pretrain": write_jsonl(root / "pretrain.jsonl", texts), "sft": write_jsonl(root / "sft.jsonl", sft)}


def error_line(main, argv, capsys, code: int = 2) -> str:
    """Run an entry point as its __main__ does; its stderr must be one line (no traceback) and the exit `code`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in os.scandir(directory) if ".tmp" in p.name)


# --- changed shape flags on --resume: refused, naming the flag, the checkpoint's value and the fix


def test_resume_refuses_changed_shape_flags_in_every_trainer(data, tmp_path, capsys):
    ar = [*TRAIN, *cli(data=data["pretrain"], save_dir=tmp_path, run_name="ar")]
    train_pretrain.main(ar)
    err = error_line(train_pretrain.main, [*ar, "--resume", *cli(hidden_size=128, num_hidden_layers=3)], capsys)
    assert "--hidden-size 128 (checkpoint: hidden_size=64)" in err
    assert "--num-hidden-layers 3 (checkpoint: num_hidden_layers=2)" in err
    assert "drop those flags to resume it, or start a new --run-name" in err
    assert train_pretrain.main([*ar, "--resume", "--max-iters", "3"])["step"] == 3  # the same flags resume

    diff = ["--train", *TRAIN, *cli(data=data["pretrain"], save_dir=tmp_path, run_name="diff")]
    diffusion.main(diff)
    err = error_line(diffusion.main, [*diff, "--resume", "--inference-rope-scaling"], capsys)
    assert "--inference-rope-scaling (checkpoint: inference_rope_scaling=False) cannot apply; drop that flag" in err
    assert "logit_shift=False" in error_line(diffusion.main, [*diff, "--resume", "--logit-shift"], capsys)

    sft = [*TRAIN, *cli(data=data["sft"], save_dir=tmp_path, run_name="sft", seq_len=64)]
    train_sft_minimind.main(sft)
    err = error_line(train_sft_minimind.main, [*sft, "--resume", "--num-key-value-heads", "4"], capsys)
    assert "--num-key-value-heads 4 (checkpoint: num_key_value_heads=2)" in err
    err = error_line(train_sft_minimind.main, [*sft, "--resume", "--untie-word-embeddings"], capsys)
    assert "--untie-word-embeddings (checkpoint: tie_word_embeddings=True)" in err


# --- Ctrl-C: the line says what is true (saved and resumable, nothing to resume, or just interrupted)


def test_interrupt_messages_say_what_was_saved(data, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = [*TRAIN, *cli(data=data["pretrain"], save_dir=tmp_path, run_name="late")]
    train_pretrain.main(argv)  # the run exists: interrupting a resume must not call it lost
    monkeypatch.setattr(train_pretrain, "next_token_loss", interrupt)
    err = error_line(train_pretrain.main, [*argv, "--resume", "--max-iters", "4"], capsys, code=130)
    assert err.startswith(f"interrupted: saved step 2 to {tmp_path / 'late.pt'}; ")
    assert err.endswith("rerun the same command with --resume to continue from it")

    text = tmp_path / "fresh.jsonl"
    text.write_text(open(data["pretrain"], encoding="utf-8").read(), encoding="utf-8")
    monkeypatch.setattr(packing, "encode_batch", interrupt)  # Ctrl-C while tokenizing
    argv = [*TRAIN, *cli(data=text, save_dir=tmp_path, run_name="early")]
    err = error_line(train_pretrain.main, argv, capsys, code=130)
    assert "before the first step: nothing was saved, so there is nothing to --resume" in err
    assert not (tmp_path / "early.pt").exists() and leftovers(tmp_path) == []
    err = error_line(train_pretrain.main, [*argv[:-2], "--run-name", "late", "--resume"], capsys, code=130)
    assert "the run's checkpoint is unchanged" in err
    assert error_line(interrupt, [], capsys, code=130) == "interrupted"  # an eval script: no --resume to offer


# --- no temp file beside the user's data after a data error or an interrupt


def test_no_temp_file_is_left_beside_the_data(tmp_path, monkeypatch):
    rows = [json.dumps({"text": f"文档{i}，内容足够长。" * 20}) for i in range(50)] + ["{not json"]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(".")
    with pytest.raises(NanoLladaError, match="bad.jsonl:51: malformed JSON"):
        packing.tokenize_to_cache(path, tokenizer)
    assert leftovers(tmp_path) == []

    path.write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")
    calls = []

    def interrupt_second_batch(tok, texts, **kwargs):
        calls.append(len(texts))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [[5] * 300 for _ in texts]  # the first batch is written to the temp file

    real_chunks = packing.chunks
    monkeypatch.setattr(packing, "chunks", lambda items, size: real_chunks(items, 10))
    monkeypatch.setattr(packing, "encode_batch", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        packing.tokenize_to_cache(path, tokenizer)
    assert len(calls) == 2 and leftovers(tmp_path) == []


# --- file-system errors: one line, earlier checkpoints intact


def test_unwritable_save_dir_and_export_dir_are_one_line(data, tmp_path, capsys, monkeypatch):
    from scripts import export_hf

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = [*TRAIN, *cli(data=data["pretrain"], save_dir=blocker, run_name="r")]
    assert "--save-dir" in error_line(train_pretrain.main, argv, capsys) and "is a file" in error_line(
        train_pretrain.main, argv, capsys
    )
    # A folder nobody can create: a read-only one, or for root (who writes through permissions, as CI runs) one
    # inside /proc, where no process may make a folder.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    unwritable = locked if os.geteuid() != 0 else Path("/proc/nano_llada_test")
    argv = [*TRAIN, *cli(data=data["pretrain"], save_dir=unwritable / "runs", run_name="r")]
    assert "cannot write there" in error_line(train_pretrain.main, argv, capsys)
    err = error_line(export_hf.main, cli(checkpoint=tmp_path / "none.pt", out=blocker / "hf"), capsys)
    assert err.startswith("error: --out")

    # mid-run: the disk refuses the second checkpoint; the first stays whole
    import model.checkpoint

    real_save, saves = torch.save, []

    def failing_save(obj, path):
        saves.append(path)
        if len(saves) > 2:
            raise RuntimeError(f"File {path} cannot be opened.")
        real_save(obj, path)

    monkeypatch.setattr(model.checkpoint.torch, "save", failing_save)
    argv = [*TRAIN, *cli(data=data["pretrain"], save_dir=tmp_path / "w", run_name="mid", save_interval=1)]
    err = error_line(train_pretrain.main, [*argv, "--max-iters", "3"], capsys)
    assert "cannot write" in err and "earlier checkpoints are intact" in err
    monkeypatch.setattr(model.checkpoint.torch, "save", real_save)
    assert read_checkpoint(tmp_path / "w" / "mid.pt").extra["step"] == 1


# --- NaN and infinite numbers, unknown or absent devices: one line


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--epochs", "inf", "--max-iters", "2"], "--epochs must be a finite number, got inf"),
        (["--dropout", "nan"], "--dropout must lie in [0, 1)"),
        (["--rope-theta", "-1"], "--rope-theta must be > 0"),
        (["--device", "tpu9"], "--device tpu9: not a device nano-llada runs on"),
    ],
)
def test_nan_flags_and_unknown_devices_are_one_line(data, tmp_path, capsys, flags, message):
    argv = [*TRAIN, *cli(data=data["pretrain"], save_dir=tmp_path, run_name="n"), *flags]
    assert message in error_line(train_pretrain.main, argv, capsys)


def test_absent_devices_are_refused():
    if not torch.backends.mps.is_available():
        with pytest.raises(NanoLladaError, match="MPS .* is not available"):
            pick_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(NanoLladaError, match="CUDA is not available"):
            pick_device("cuda:1")
    with pytest.raises(NanoLladaError, match="not a device"):
        pick_device("meta")


# --- messages that name the real cause


def test_messages_name_the_real_cause(data, tmp_path, capsys):
    one_doc = write_jsonl(tmp_path / "one.jsonl", [{"text": "一段很长的文字。" * 400}])
    err = error_line(train_pretrain.main, [*TRAIN, *cli(data=one_doc, save_dir=tmp_path)], capsys)
    assert "single document" in err and "too few" not in err

    sft = [*TRAIN, *cli(save_dir=tmp_path, seq_len=8)]
    err = error_line(train_sft_minimind.main, [*sft, "--data", data["sft"]], capsys)
    assert "40 conversation(s) have no answer token within --max-seq-len 8" in err and "None" not in err

    bad_sft = tmp_path / "bad_sft.jsonl"
    bad_sft.write_text('{"conversations": [\n' + json.dumps({"conversations": [{"role": "user", "content": 123}]}))
    err = error_line(train_sft_minimind.main, [*TRAIN, *cli(data=bad_sft, save_dir=tmp_path)], capsys)
    assert "2 invalid row(s)" in err and "--skip-bad-lines" not in err  # SFT skips bad rows already: no such flag
    int_content = {"conversations": [{"role": "user", "content": 123}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(NanoLladaError, match=r":2: turn 0 \(user\) has content of type int, expected a string"):
        list(iter_conversations(write_jsonl(tmp_path / "int.jsonl", [turns("q", "a"), int_content]), False))

    bad_text = tmp_path / "bad_text.jsonl"
    bad_text.write_text(json.dumps({"text": "好"}) + "\n{oops\n", encoding="utf-8")
    err = error_line(train_pretrain.main, [*TRAIN, *cli(data=bad_text, save_dir=tmp_path)], capsys)
    assert "bad_text.jsonl:2: malformed JSON" in err and "--skip-bad-lines skips (and counts) such lines" in err


# --- kill -9: the metrics written so far survive it, and --resume continues them


def test_metrics_survive_kill_9_and_resume_continues_them(data, tmp_path):
    """A real SIGKILL of a training process after its first checkpoint: the metrics lines up to the kill are on
    disk, and the resumed run appends to them, so the history (and the loss plot) covers the whole run."""
    import signal
    import subprocess
    import sys
    import time

    flags = [*cli(data=data["pretrain"], save_dir=tmp_path, run_name="run"), *TRAIN]
    flags = [*flags[: flags.index("--max-iters")], *cli(max_iters=400, save_interval=2, eval_interval=200)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.train.train_pretrain", *flags], env=env)
    metrics, checkpoint = tmp_path / "run_metrics.jsonl", tmp_path / "run.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        checkpoint.exists() and read_checkpoint(checkpoint).extra.get("step", 0) >= 4
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = read_checkpoint(checkpoint).extra["step"]
    before = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert saved >= 4 and before and max(before) >= saved - 1  # flushed as written, not at the end of the run
    resumed = [*flags[: flags.index("--max-iters")], *cli(max_iters=saved + 3, save_interval=2), "--resume"]
    train_pretrain.main(resumed)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert [s for s in steps if s <= saved][:3] == sorted(before)[:3] and max(steps) == saved + 3
    assert (tmp_path / "run_loss.png").exists()


def test_sigterm_saves_a_resumable_checkpoint_and_says_so(data, tmp_path):
    """A scheduler's SIGTERM is handled as Ctrl-C is: the last finished step is saved (no periodic save has run
    here), the run says so in one line and exits 143, and --resume continues from that step."""
    import signal
    import subprocess
    import sys
    import time

    flags = [*cli(data=data["pretrain"], save_dir=tmp_path, run_name="run"), *TRAIN]
    flags = [*flags[: flags.index("--max-iters")], *cli(max_iters=400, save_interval=1000, eval_interval=1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "scripts.train.train_pretrain", *flags]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run_metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.2)
    assert not (tmp_path / "run.pt").exists()
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    saved = read_checkpoint(tmp_path / "run.pt").extra["step"]
    assert proc.returncode == 143 and saved >= 1
    assert f"terminated (SIGTERM): saved step {saved} to" in stderr.strip().splitlines()[-1]
    resumed = [*flags[: flags.index("--max-iters")], *cli(max_iters=saved + 2), "--resume"]
    assert train_pretrain.main(resumed)["step"] == saved + 2
