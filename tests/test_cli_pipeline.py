"""End to end through the entry points on a tiny config: AR pretrain -> eval, diffusion from AR -> eval,
SFT of both -> one-prompt (three modes) and accuracy; plus the one-line errors a user sees."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import TINY_MODEL, sample_subset

from model.checkpoint import read_checkpoint
from model.tokenizer import chat_text, encode, load_tokenizer
from scripts.common.data.sft import collate, encode_conversation, load_sft_examples
from scripts.common.pipeline import cli
from scripts.eval import eval_diffusion, eval_minimind, eval_sft_accuracy, eval_sft_one_prompt
from scripts.train import diffusion, train_pretrain, train_sft_diffusion, train_sft_minimind

TINY = cli(**TINY_MODEL, device="cpu")
ROWS = {"pretrain": 1500, "pretrain_val": 60, "sft_train": 240, "sft_val": 24, "sft_test": 12}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_subset(tmp_path_factory.mktemp("sample"), ROWS)


def pretrain_runs(sample, out) -> dict:
    """AR pretraining, then diffusion initialised from it: each run's summary."""
    pre = [
        *cli(data=sample["pretrain"], tokenizer_dir=".", save_dir=out),
        *TINY,
        *cli(seq_len=32, batch_size=8, max_iters=30, warmup_steps=3, learning_rate=3e-3, eval_interval=15),
        *cli(eval_batches=3, val_fraction=0.02),
    ]
    runs = {"ar": train_pretrain.main([*pre, "--run-name", "ar"])}
    from_ar = cli(mask_schedule="iid_t", init_from_minimind=out / "ar_state_dict.pt", early_stop_patience=5)
    runs["diffusion"] = diffusion.main(["--train", "--use-tokenizer", *pre, "--run-name", "diff", *from_ar])
    return runs


def sft_runs(sample, out) -> dict:
    """SFT of the AR and of the best diffusion checkpoint: each run's summary."""
    sft = [
        *cli(data=sample["sft_train"], eval_data=sample["sft_val"], tokenizer_dir=".", save_dir=out),
        *cli(max_seq_len=160, batch_size=8, max_steps=20, learning_rate=2e-3, warmup_steps=2, eval_interval=10),
        *cli(eval_batches=3, device="cpu"),
    ]
    return {
        "ar_sft": train_sft_minimind.main([*sft, *cli(run_name="ar_sft", load_from=out / "ar_state_dict.pt")]),
        "diffusion_sft": train_sft_diffusion.main([*sft, *cli(run_name="diff_sft", load_from=out / "diff_best.pt")]),
    }


@pytest.fixture(scope="module")
def trained(sample, tmp_path_factory):
    """AR pretrain, diffusion from it, and both SFTs: each run's summary and the directory."""
    out = tmp_path_factory.mktemp("weights")
    return {**pretrain_runs(sample, out), **sft_runs(sample, out)}, out


def val_losses(out, run):
    return [
        json.loads(line)["val_loss"]
        for line in (out / f"{run}_metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]


@pytest.mark.parametrize(
    "run,files",
    [
        ("ar", ["ar.pt", "ar_state_dict.pt", "ar_best.pt", "ar_metrics.jsonl", "ar_loss.png"]),
        ("diff", ["diff.pt", "diff_best.pt", "diff_loss.png"]),
        ("ar_sft", ["ar_sft.pt", "ar_sft_state_dict.pt", "ar_sft_loss.png"]),
        ("diff_sft", ["diff_sft.pt", "diff_sft_state_dict.pt", "diff_sft_loss.png"]),
    ],
)
def test_every_run_lowers_validation_loss_and_writes_its_files(trained, run, files):
    _, out = trained
    for name in files:
        assert (out / name).stat().st_size > 0, name
    losses = val_losses(out, run)
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert not list(out.glob("*.tmp"))


def test_checkpoints_carry_kind_config_and_every_tensor_across_stages(trained):
    _, out = trained
    ar, diff, sft = (read_checkpoint(out / f) for f in ("ar_state_dict.pt", "diff_best.pt", "diff_sft_state_dict.pt"))
    assert (ar.kind, diff.kind, sft.kind) == ("ar", "diffusion", "diffusion")
    assert replace(diff.config, prompt_causal=True) == sft.config and ar.config.num_attention_heads == 4  # SFT's one
    assert replace(ar.config, logit_shift=diff.config.logit_shift) == diff.config  # the conversion's one change
    assert set(ar.state_dict) == set(diff.state_dict) == set(sft.state_dict)
    assert ar.tokenizer == diff.tokenizer == sft.tokenizer


def test_evals_run_on_the_trained_models(trained, sample, capsys):
    _, out = trained
    held_out = cli(eval_data=sample["pretrain_val"], seq_len=32, device="cpu")
    greedy = cli(prompt="中国", max_new_tokens=12, temperature=0)
    result = eval_minimind.main([*cli(checkpoint=out / "ar_state_dict.pt", tokenizer_dir="."), *greedy, *held_out])
    assert 1 <= len(result["new_tokens"]) <= 12 and result["eval"]["perplexity"] > 1
    sample_flags = cli(prompt="中国", max_new_tokens=16, gen_steps=8, block_length=8)
    scoring = cli(eval_max_batches=2, mc_samples=2, cond_ll_response="人民", cond_ll_nmc=4)
    result = eval_diffusion.main(
        [*cli(checkpoint=out / "diff_best.pt", tokenizer_dir="."), *sample_flags, *held_out, *scoring]
    )
    assert result["sample"]["nfe"] <= 8 and result["eval"]["nelbo"] > 0 and result["cond_ll"]["value"] < 0
    assert "NFE" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["ar", "diffusion", "both"])
def test_one_prompt_runs_in_all_three_modes(trained, mode, capsys):
    _, out = trained
    flags = {
        "ar": ["--minimind-checkpoint", str(out / "ar_sft_state_dict.pt")],
        "diffusion": ["--diffusion-checkpoint", str(out / "diff_sft_state_dict.pt")],
    }
    chosen = flags["ar"] + flags["diffusion"] if mode == "both" else flags[mode]
    rows = eval_sft_one_prompt.main(
        [
            *cli(prompt="你好，请介绍你自己。", tokenizer_dir="."),
            *chosen,
            *cli(seq_len=96, max_new_tokens=16, device="cpu"),
        ]
    )
    printed = capsys.readouterr().out
    assert ("=== AR Output ===" in printed) == (mode != "diffusion")
    assert ("=== Diffusion Output ===" in printed) == (mode != "ar")
    for key in ("ar", "diffusion"):
        if key in rows[0]:
            stats = rows[0][key]
            assert (
                stats["new_tokens"] <= 16
                and stats["forward_passes"] >= 1
                and stats["first_seconds"] <= stats["seconds"]
            )


def test_prompt_file_writes_jsonl_and_batched_answers_equal_one_at_a_time(trained, tmp_path):
    _, out = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("你好\n今天天气怎么样？\n", encoding="utf-8")
    ar = cli(minimind_checkpoint=out / "ar_sft_state_dict.pt")
    eval_sft_one_prompt.main([*cli(prompt_file=prompts, tokenizer_dir="."), *ar, *cli(max_new_tokens=8, device="cpu")])
    rows = [json.loads(line) for line in (tmp_path / "prompts.txt.answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["你好", "今天天气怎么样？"] and all("ar" in r for r in rows)
    both = [*ar, *cli(diffusion_checkpoint=out / "diff_sft_state_dict.pt")]
    batched = eval_sft_one_prompt.main(
        [
            *cli(prompt_file=prompts, tokenizer_dir=".", batch_size=2),
            *both,
            *cli(max_new_tokens=8, device="cpu", out=tmp_path / "batched.jsonl"),
        ]
    )
    assert [r["ar"]["text"] for r in batched] == [r["ar"]["text"] for r in rows]
    assert all(r["ar"]["batch"] == r["diffusion"]["batch"] == 2 for r in batched)


def test_accuracy_reports_both_routes_and_batching_changes_no_prediction(trained, sample, tmp_path):
    _, out = trained
    models = cli(minimind_checkpoint=out / "ar_sft_state_dict.pt", diffusion_checkpoint=out / "diff_sft_state_dict.pt")
    predictions = {}
    for batch in ("1", "5"):  # batched (left-padded) decoding answers what one-at-a-time decoding answers
        written = tmp_path / f"predictions_{batch}.jsonl"
        result = eval_sft_accuracy.main(
            [
                *cli(data=sample["sft_test"], tokenizer_dir=".", batch_size=batch),
                *models,
                *cli("--score-labels", device="cpu", out=written, mc_samples=4),
            ]
        )
        for name in ("AR", "Diffusion"):
            r = result[name]
            assert r["questions"] == 12 and 0 <= r["correct"] <= 12 and 0 <= r["unparseable"] <= 12
            assert sum(r["likelihood_choices"].values()) == 12
            assert r["likelihood_accuracy"] * 12 == round(r["likelihood_accuracy"] * 12)
        predictions[batch] = written.read_text(encoding="utf-8")
    assert predictions["1"] == predictions["5"] and predictions["1"].count("\n") == 24
    assert all("likelihood_label" in json.loads(line) for line in predictions["1"].splitlines())


def test_sft_labels_cover_exactly_the_assistant_spans():
    tok = load_tokenizer(".")
    turns = [
        {"role": "system", "content": "简短回答"},
        {"role": "user", "content": "一加一？"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "再加一？"},
        {"role": "assistant", "content": "三"},
    ]
    ids, mask = encode_conversation(tok, turns)
    assert ids == encode(tok, chat_text(tok, turns, False))[: len(ids)]  # the training text is the chat template's
    spans = tok.decode([i for i, m in zip(ids, mask) if m])
    assert spans == "二<|im_end|>三<|im_end|>"
    assert ids[-1] == 2 and mask[-1] == 1  # the row ends at the last <|im_end|>
    prompt = encode(tok, chat_text(tok, turns[:-1], add_generation_prompt=True))
    assert ids[: len(prompt)] == prompt  # eval renders the same text up to the answer


@pytest.mark.parametrize("tokenizer_dir", [".", "minimind2"])
def test_batched_sft_tokenization_equals_the_turn_by_turn_reference(tokenizer_dir, request):
    """encode_conversations (one batched tokenizer call, spans from character offsets) gives exactly what
    encode_conversation (each prefix rendered and tokenized) gives, for both tokenizers."""
    from scripts.common.data.sft import encode_conversations

    tok = load_tokenizer("." if tokenizer_dir == "." else request.getfixturevalue("minimind2_fixtures"))
    conversations = [
        [{"role": "user", "content": "这家店的东西很好，物流也快。"}, {"role": "assistant", "content": "正面"}],
        [
            {"role": "system", "content": "简短回答"},
            {"role": "user", "content": "一加一？"},
            {"role": "assistant", "content": "二"},
            {"role": "user", "content": "再加一？ \n"},
            {"role": "assistant", "content": " 三\n\n"},
            {"role": "user", "content": "没有回答"},
        ],
        [{"role": "user", "content": "Hello, <b>world</b>!"}, {"role": "assistant", "content": "Hi there 😀 — ok?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "\n"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "b"},
        ],
    ]
    assert encode_conversations(tok, conversations) == [encode_conversation(tok, turns) for turns in conversations]


def test_ar_sft_loss_at_scored_positions_equals_the_full_loss(tmp_path):
    """The SFT batch lists each row's answer positions; the head run only there gives the loss and gradients of the
    head run everywhere (rows of different lengths, one with two answers)."""
    from model.config import ModelConfig
    from model.objectives.ar_loss import next_token_loss
    from model.transformer import Transformer

    tok = load_tokenizer(".")
    rows = [
        [{"role": "user", "content": "问" * k}, {"role": "assistant", "content": "答" * (1 + k % 3)}] for k in (1, 5, 9)
    ]
    rows.append(rows[0] + [{"role": "user", "content": "再问"}, {"role": "assistant", "content": "再答一次"}])
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversations": r}, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    batch = collate(load_sft_examples(path, tok, 64), range(len(rows)), "ar")
    scored = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)  # t predicts t + 1
    assert batch["scored_at"].shape[1] == int(scored.sum(1).max())
    for row, positions in enumerate(batch["scored_at"]):
        n = int(scored[row].sum())  # its answer positions first, in order, then positions that score nothing
        assert positions[:n].tolist() == scored[row].nonzero().flatten().tolist()
        assert not scored[row, positions[n:]].any()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=len(tok), **TINY_MODEL))
    losses, grads = [], []
    for scored_at in (None, batch["scored_at"]):
        model.zero_grad()
        loss = next_token_loss(model, batch["input_ids"], batch["labels"], scored_at)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_diffusion_sft_never_masks_the_prompt(tmp_path):
    from model.objectives.masking import bernoulli_masks

    tok = load_tokenizer(".")
    rows = [
        {
            "conversations": [
                {"role": "user", "content": "问题" * k},
                {"role": "assistant", "content": "答" * (3 - k % 3)},
            ]
        }
        for k in range(1, 7)
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = load_sft_examples(path, tok, 64)
    batch = collate(examples, range(6), "diffusion")
    ar = collate(examples, range(6), "ar")
    for i in range(6):
        ids, assistant = examples.example(i)
        n = len(ids)
        assert not batch["maskable"][i, :n][~torch.from_numpy(assistant.astype(bool))].any()  # prompt: never maskable
        assert batch["maskable"][i, n:].all() and (batch["input_ids"][i, n:] == 2).all()  # EOS padding: maskable
        assert (ar["labels"][i, n:] == -100).all() and (ar["input_ids"][i, n:] == 0).all()  # AR padding: never trained
    masked = bernoulli_masks(batch["maskable"], torch.full((6,), 0.999), torch.Generator().manual_seed(0))
    assert not (masked & ~batch["maskable"]).any()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["scripts.train.train_pretrain", "--data", "nope.jsonl", "--tokenizer-dir", "."],
            "nope.jsonl: data file not found",
        ),
        (["scripts.eval.eval_minimind", "--checkpoint", "weights/none.pt"], "weights/none.pt: checkpoint not found"),
        (["scripts.train.diffusion", "--data", "x.jsonl"], "pass --train"),
        (["scripts.eval.eval_sft_one_prompt", "--prompt", "hi"], "give --minimind-checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message):
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_wrong_kind_checkpoint_names_the_right_script(trained, tmp_path):
    from model.errors import NanoLladaError

    _, out = trained
    with pytest.raises(NanoLladaError, match="scripts.eval.eval_minimind"):
        eval_diffusion.main(["--checkpoint", str(out / "ar.pt"), "--tokenizer-dir", "."])
    with pytest.raises(NanoLladaError, match="prompt is .* tokens, which leaves no room"):
        eval_diffusion.main(
            ["--checkpoint", str(out / "diff.pt"), "--tokenizer-dir", ".", "--seq-len", "3", "--prompt", "一二三四五六"]
        )
    with pytest.raises(NanoLladaError, match="does not divide the generation length"):
        eval_diffusion.main(
            cli(
                checkpoint=out / "diff.pt",
                tokenizer_dir=".",
                max_new_tokens=10,
                block_length=4,
                decoding="bidirectional",
            )
        )


def test_diffusion_initialised_from_the_minimind2_fixture_copies_every_tensor(minimind2_fixtures, tmp_path):
    from types import SimpleNamespace

    from model import load_model
    from scripts.common.training.run_files import RunFiles

    tokenizer = load_tokenizer(minimind2_fixtures)
    flags = diffusion.settings(
        cli("--train", init_from_minimind=minimind2_fixtures / "minimind2_tiny.pth", tokenizer_dir=minimind2_fixtures)
    )
    model = diffusion.initial_model(flags, tokenizer, RunFiles(SimpleNamespace(out_dir=str(tmp_path), run_name="x")))
    reference, _ = load_model(minimind2_fixtures / "minimind2_tiny.pth")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ours[name][:6400], tensor[:6400])  # every real token row; only the <|mask|> row is new
            assert not torch.equal(ours[name][6400], tensor[6400])  # mean + noise, not the bare mean
        else:
            assert torch.equal(ours[name], tensor), name


def test_sft_logs_the_first_answer_tokens_share_of_the_logit_gradient_every_step(trained):  # label_gradient_share
    rows = [json.loads(line) for run in ("ar_sft", "diff_sft") for line in open(trained[1] / f"{run}_metrics.jsonl")]
    assert all(0 < row["label_share"] < 1 for row in rows if "loss" in row) and "label_share" in rows[1]
