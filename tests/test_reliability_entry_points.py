"""The second fault campaign's causes (issue 30), each driven through the real entry points: checks that reach every
sibling, ranges checked while the flags are parsed, one resume rule for structural settings, nothing silently wrong,
bounded work, outputs checked before the work, and words that do not mislead. The server's cases are in
tests/test_serve.py; SIGTERM (cause 5) is not covered here.
"""

import random

import pytest
import test_reliability_training as training_faults
import torch
from conftest import TINY_MODEL
from test_reliability_training import TRAIN, error_line, write_jsonl

from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts import bench, export_hf
from scripts.common.data.readers import iter_texts
from scripts.common.pipeline import cli
from scripts.eval import compare, eval_diffusion, eval_minimind, eval_sft_accuracy, eval_sft_one_prompt
from scripts.train import (
    diffusion,
    train_dpo_minimind,
    train_pretrain,
    train_sft_diffusion,
    train_sft_minimind,
    train_tokenizer,
)

# The training faults' fixtures: no progress bars on stderr (what error_line reads), and the tiny corpora.
no_progress_bars, corpora = training_faults._no_progress_bars, training_faults.data


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory) -> dict:
    """Two tiny diffusion runs of 2 steps: bidirectional, and block diffusion with blocks of 16."""
    root = tmp_path_factory.mktemp("runs")
    flags = {}
    for name, extra in (("bidir", []), ("block", ["--block-size", "16"])):
        flags[name] = ["--train", *TRAIN, *cli(data=corpora["pretrain"], save_dir=root, run_name=name), *extra]
        diffusion.main(flags[name])
    return {"root": root, "flags": flags}


def pairs_file(path, same_answer: bool = False) -> str:
    rows = [
        {
            "chosen": [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": "好"}],
            "rejected": [
                {"role": "user", "content": f"问题{i}"},
                {"role": "assistant", "content": "好" if same_answer else "坏"},
            ],
        }
        for i in range(16)
    ]
    return write_jsonl(path, rows)


# --- cause 1: the checks every entry point shares reach the siblings that had their own


def test_device_threshold_and_temperature_checks_reach_every_entry_point(capsys):
    assert "--device tpu9: not a device nano-llada runs on" in error_line(bench.main, ["--device", "tpu9"], capsys)
    if not torch.cuda.is_available():
        err = error_line(bench.main, ["--device", "cuda:7"], capsys)
        assert "--device cuda:7 requested but CUDA is not available; use --device cpu" in err
    for threshold in ("1.5", "-0.5"):  # -0.5 committed every answer in one forward pass
        argv = ["--diffusion-checkpoint", "never_read.pt", "--threshold", threshold]
        assert f"--threshold must be in (0, 1], got {float(threshold)}" in error_line(
            eval_sft_accuracy.main, argv, capsys
        )
    argv = ["--checkpoint", "never_read.pt", "--temperature", "1e300"]
    assert "--temperature must be in [0, 10000], got 1e+300" in error_line(eval_minimind.main, argv, capsys)


# --- cause 2: every count has a range, checked while the flags are parsed (the data named here does not exist)


@pytest.mark.parametrize(
    "main, flags, message",
    [
        (eval_minimind.main, ["--eval-batch-size", "0"], "--eval-batch-size must be >= 1, got 0"),
        (eval_diffusion.main, ["--mc-samples", "0"], "--mc-samples must be >= 1, got 0"),
        (eval_diffusion.main, ["--cond-ll-nmc", "0"], "--cond-ll-nmc must be >= 1, got 0"),
        (train_pretrain.main, ["--seq-len", "1"], "--seq-len must be >= 2, got 1"),  # trained to NaN before
        (train_pretrain.main, ["--early-stop-patience", "-1"], "--early-stop-patience must be >= 0, got -1"),
        (train_sft_minimind.main, ["--eval-batches", "0"], "--eval-batches must be >= 1, got 0"),
    ],
)
def test_counts_are_refused_before_any_data_is_read(tmp_path, capsys, main, flags, message):
    if main in (eval_minimind.main, eval_diffusion.main):
        argv = ["--checkpoint", str(tmp_path / "none.pt"), "--eval-data", str(tmp_path / "none.jsonl")]
    else:
        argv = [*TRAIN, *cli(data=tmp_path / "none.jsonl", save_dir=tmp_path / "w")]
    assert message in error_line(main, [*argv, *flags], capsys)
    assert not (tmp_path / "w").exists()


# --- cause 4: one resume rule for the settings that decide what a run trains


def test_resume_keeps_block_size_eos_padding_and_names_the_run_it_resumes(corpora, runs, tmp_path, capsys):
    bidir, block = runs["flags"]["bidir"], runs["flags"]["block"]
    err = error_line(diffusion.main, [*bidir, "--resume", "--block-size", "16"], capsys)  # silently BDLM before
    assert "--block-size 16 (checkpoint: none) cannot apply" in err and "start a new --run-name" in err
    err = error_line(diffusion.main, [*block[:-2], "--resume"], capsys)
    assert "--block-size (not given) (checkpoint: 16)" in err
    assert diffusion.main([*block, "--resume", "--max-iters", "3"])["step"] == 3  # the same flags resume

    sft = [*TRAIN, *cli(data=corpora["sft"], save_dir=tmp_path, run_name="sft", seq_len=64, eos_padding_length=8)]
    sft += cli(load_from=runs["root"] / "bidir.pt")
    train_sft_diffusion.main(sft)
    err = error_line(train_sft_diffusion.main, [*sft, "--resume", "--eos-padding-length", "16"], capsys)
    assert "--eos-padding-length 16 (checkpoint: 8)" in err
    assert "--block-size 8 (checkpoint: none)" in error_line(
        train_sft_diffusion.main, [*sft, "--resume", "--block-size", "8"], capsys
    )

    start = tmp_path / "start.pt"
    model = Transformer(ModelConfig(**TINY_MODEL, vocab_size=len(load_tokenizer("."))))
    save_checkpoint(start, "ar", model.config, model, tokenizer_identity(load_tokenizer(".")), step=0)
    dpo = [*TRAIN, *cli(data=pairs_file(tmp_path / "pairs.jsonl"), load_from=start, save_dir=tmp_path, run_name="dpo")]
    train_dpo_minimind.main(dpo)
    err = error_line(train_dpo_minimind.main, [*dpo, "--resume", "--hidden-size", "128"], capsys)
    assert err.startswith(f"error: --resume: {tmp_path / 'dpo.pt'} keeps its model shape") and "start.pt" not in err


# --- cause 6: nothing silently wrong


def test_export_keeps_the_block_size_it_decodes_with(runs, tmp_path):
    out = tmp_path / "hf"
    export_hf.main(cli(checkpoint=runs["root"] / "block_state_dict.pt", out=out, tokenizer_dir="."))
    exported = read_checkpoint(out)
    assert trained_block_size(exported.extra) == 16
    sampler = sampler_for_checkpoint(exported, DiffusionSamplerConfig(gen_length=16, steps=16))
    assert sampler.block_causal and sampler.block_size == 16  # it decodes as the checkpoint it came from


def test_data_that_would_train_wrong_is_refused(corpora, tmp_path, capsys):
    texts = [{"text": f"第{i}篇：今天天气很好。"} for i in range(60)] + [{"text": "很长的一段文字。" * 1500}]
    argv = [*TRAIN, *cli(data=write_jsonl(tmp_path / "long_last.jsonl", texts), save_dir=tmp_path)]
    err = error_line(train_pretrain.main, argv, capsys)
    assert "validation holds out whole documents from the end" in err and "put a shorter document last" in err

    start = tmp_path / "start.pt"
    model = Transformer(ModelConfig(**TINY_MODEL, vocab_size=len(load_tokenizer("."))))
    save_checkpoint(start, "ar", model.config, model, tokenizer_identity(load_tokenizer(".")), step=0)
    dpo = [*TRAIN, *cli(load_from=start, save_dir=tmp_path, run_name="dpo")]
    same = pairs_file(tmp_path / "same.jsonl", same_answer=True)
    err = error_line(train_dpo_minimind.main, [*dpo, "--data", same], capsys)
    assert "same.jsonl:1: 'chosen' and 'rejected' give the same answer" in err
    err = error_line(
        train_dpo_minimind.main, [*dpo, "--data", pairs_file(tmp_path / "p.jsonl"), "--beta", "inf"], capsys
    )
    assert "--beta must be a finite number > 0, got inf" in err

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeff第一行\r\n第二行\n".encode())
    assert list(iter_texts(bom)) == ["第一行", "第二行"]  # the BOM was trained on before
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("第一行\n".encode() * 100 + "café\n".encode("latin-1"))
    err = error_line(train_pretrain.main, [*TRAIN, *cli(data=latin1, save_dir=tmp_path)], capsys)
    assert "latin1.txt:101: not UTF-8" in err and "--skip-bad-lines" in err  # replaced silently before


# --- cause 7: bounded work (the server's steps are bounded in tests/test_serve.py)


def test_eos_padding_is_bounded_by_the_row_and_the_positions(corpora, tmp_path, capsys):
    argv = [*TRAIN, *cli(data=tmp_path / "none.jsonl", save_dir=tmp_path, seq_len=64)]
    for padding in ("30000", "100000"):  # an allocation error after half a minute, or a late max_position_embeddings
        err = error_line(train_sft_diffusion.main, [*argv, "--eos-padding-length", padding], capsys)
        assert "--eos-padding-length must be >= 0 and <= --max-seq-len 64 (it stands for a generation" in err
    argv = [*TRAIN, *cli(data=corpora["sft"], save_dir=tmp_path, seq_len=64, max_position_embeddings=64)]
    err = error_line(train_sft_diffusion.main, [*argv, "--eos-padding-length", "8"], capsys)
    assert "--max-seq-len 64 plus --eos-padding-length 8 exceeds the model's 64 positions" in err


# --- cause 8: outputs checked before the work, nothing left behind, a cut-short metrics line read past


def test_outputs_are_checked_first_and_nothing_is_left_behind(corpora, runs, tmp_path, capsys):
    missing = tmp_path / "missing" / "out.jsonl"
    argv = ["--minimind-checkpoint", "never_read.pt", "--out", str(missing)]
    err = error_line(eval_sft_accuracy.main, argv, capsys)
    assert f"--out {missing}: the folder {missing.parent} does not exist" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n", encoding="utf-8")
    err = error_line(eval_sft_one_prompt.main, [*argv, "--prompt-file", str(prompts)], capsys)
    assert f"--out {missing}: the folder" in err

    truncated = tmp_path / "truncated.pt"
    whole = (runs["root"] / "bidir_state_dict.pt").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    for checkpoint, tokenizer_dir in ((truncated, "."), (runs["root"] / "bidir_state_dict.pt", tmp_path / "no_tok")):
        error_line(export_hf.main, cli(checkpoint=checkpoint, out=tmp_path / "hf", tokenizer_dir=tokenizer_dir), capsys)
        assert not (tmp_path / "hf").exists()

    metrics = runs["root"] / "bidir_metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 9, "val_lo', encoding="utf-8")  # what a kill -9 can leave
    argv = cli(checkpoint=runs["root"] / "bidir.pt", eval_data=corpora["pretrain"], seq_len=32, eval_batch_size=2)
    argv += cli(eval_max_batches=1, mc_samples=1, out=tmp_path / "cmp", device="cpu")
    assert compare.main(argv)["results"][0]["final_val_loss"] > 0


# --- cause 9: words that do not mislead


def test_messages_say_what_is_true(corpora, tmp_path, capsys):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(0).randbytes(3000))
    err = error_line(eval_minimind.main, ["--checkpoint", str(noise)], capsys)
    assert "not a readable PyTorch checkpoint" in err and "weights_only" not in err and "succeed" not in err

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    err = error_line(eval_sft_one_prompt.main, ["--minimind-checkpoint", "x.pt", "--prompt-file", str(empty)], capsys)
    assert "write one prompt a line" in err and "sample" not in err

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = error_line(train_tokenizer.main, ["--out-dir", str(a_file)], capsys)
    assert f"--out-dir {a_file}: is a file, not a directory" in err

    ar = [*TRAIN, *cli(data=corpora["pretrain"], save_dir=tmp_path, run_name="ar_run")]
    train_pretrain.main(ar)
    err = error_line(diffusion.main, ["--train", *ar, "--resume"], capsys)
    assert "choose another --run-name" in err and "eval_minimind" not in err


@pytest.mark.parametrize(
    "module,argv",
    [
        ("scripts.serve", ["--checkpoint", "none.pt", "--max-batch", "0"]),
        ("scripts.serve", ["--checkpoint", "none.pt", "--top-p", "0"]),
        ("scripts.serve", ["--checkpoint", "none.pt", "--port", "70000"]),
        ("scripts.train.merge_checkpoints", ["--run-name", "r", "--k", "0"]),
        ("scripts.train.train_tokenizer", ["--vocab-size", "2"]),
        ("scripts.quickstart", ["--sft-steps", "0"]),
        ("scripts.eval.dpo_variance", ["--checkpoint", "none.pt", "--data", "none.jsonl", "--redraws", "1"]),
        ("scripts.eval.eval_sft_one_prompt", ["--prompt", "x", "--ar-top-k", "-1"]),
        ("scripts.eval.eval_minimind", ["--checkpoint", "none.pt", "--top-p", "1.5"]),
        ("scripts.eval.eval_multiple_choice", ["--checkpoint", "none.pt", "--data", "none.jsonl", "--limit", "0"]),
        ("scripts.bench", ["--tiny", "--prompts", "0"]),
    ],
)
def test_every_entry_point_bounds_its_counts_at_parse_time(module, argv, capsys):
    """The ranges reach the entry points beside the ones the campaign named: one line naming the flag, before any
    file (none of those named here exists) is read."""
    import importlib

    flag = argv[-2]
    err = error_line(importlib.import_module(module).main, argv, capsys)
    assert err.startswith(f"error: {flag} must be"), err
