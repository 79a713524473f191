"""End-to-end: the LLaDA 2.0 switches of scripts.train.diffusion, the merge and block-causal eval, on a tiny config."""

import json

import pytest

from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from scripts.data.sample import build_sample
from scripts.eval import eval_diffusion
from scripts.train import diffusion, merge_checkpoints

TINY = [
    "--hidden-size",
    "64",
    "--num-hidden-layers",
    "2",
    "--num-attention-heads",
    "4",
    "--num-key-value-heads",
    "2",
    "--max-position-embeddings",
    "64",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--val-fraction",
    "0.05",
    "--eval-batches",
    "2",
    "--log-interval",
    "1",
    "--warmup-steps",
    "1",
    "--learning-rate",
    "3e-3",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first documents of the offline sample corpus: enough rows for a few steps, quick to tokenize."""
    out = tmp_path_factory.mktemp("llada2")
    lines = build_sample(out)["sample_pretrain.jsonl"].read_text(encoding="utf-8").splitlines()[:120]
    path = out / "tiny.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(corpus, save_dir, name, *flags):
    return diffusion.main(
        [
            "--train",
            "--tokenizer-dir",
            ".",
            "--data",
            str(corpus),
            "--save-dir",
            str(save_dir),
            "--run-name",
            name,
            *TINY,
            *flags,
        ]
    )


def metrics(save_dir, name):
    return [json.loads(line) for line in (save_dir / f"{name}_metrics.jsonl").read_text().splitlines()]


def test_wsd_curriculum_with_time_weights_and_document_mask_then_merge_and_block_causal_eval(corpus, tmp_path):
    summary = run(
        corpus,
        tmp_path,
        "wsd",
        "--mask-schedule",
        "wsd",
        "--use-block-curriculum",
        "--wsd-block-sizes-up",
        "1,4,16",
        "--wsd-phase-ratios",
        "0.3,0.3,0.4",
        "--inference-block-size",
        "4",
        "--time-weighted-loss",
        "--use-doc-attention-mask",
        "--keep-top-k",
        "2",
        "--max-iters",
        "10",
        "--eval-interval",
        "3",
    )
    records = metrics(tmp_path, "wsd")
    steps = [r for r in records if "loss" in r]
    assert [(r["phase"], r["block"]) for r in steps] == [
        ("warmup", 1),
        ("warmup", 4),
        ("warmup", 16),
        ("stable", 16),
        ("stable", 16),
        ("stable", 16),
        ("decay", 16),
        ("decay", 16),
        ("decay", 8),
        ("decay", 4),
    ]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0]  # the MDLM validation loss fell
    full = read_checkpoint(tmp_path / "wsd.pt")
    assert full.extra["diffusion"]["block_curriculum"]["sizes_down"] == [16, 8, 4]
    assert full.extra["diffusion"]["time_weight_schedule"] == "cosine" and full.extra["diffusion"]["doc_attention_mask"]
    assert summary["step"] == 10 and len(json.loads((tmp_path / "wsd_topk.json").read_text())) == 2

    merged = merge_checkpoints.main(["--run-name", "wsd", "--save-dir", str(tmp_path), "--k", "2"])
    assert (tmp_path / "wsd_merged.pt").exists() and len(merged["merged"]) == 2

    result = eval_diffusion.main(
        [
            "--checkpoint",
            str(tmp_path / "wsd.pt"),
            "--tokenizer-dir",
            ".",
            "--seq-len",
            "16",
            "--prompt",
            "今天",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--no-early-stop",
        ]
    )
    assert result["sample"]["block_causal"]  # ended in the decay phase at block 4: decoded block-causally
    uncached = eval_diffusion.main(
        [
            "--checkpoint",
            str(tmp_path / "wsd.pt"),
            "--tokenizer-dir",
            ".",
            "--seq-len",
            "16",
            "--prompt",
            "今天",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
            "--no-early-stop",
            "--no-kv-cache",
        ]
    )
    assert uncached["sample"]["tokens"] == result["sample"]["tokens"]


def test_wsd_without_curriculum_and_linear_time_weight_is_llada_eq3(corpus, tmp_path):
    common = ["--max-iters", "2", "--eval-interval", "2"]
    run(corpus, tmp_path, "eq3", *common)
    run(
        corpus,
        tmp_path,
        "wsd_plain",
        "--mask-schedule",
        "wsd",
        "--time-weighted-loss",
        "--time-weight-schedule",
        "linear",
        *common,
    )
    losses = lambda name: [r.get("loss", r.get("val_loss")) for r in metrics(tmp_path, name) if "tokens_per_s" not in r]  # noqa: E731
    assert losses("wsd_plain") == pytest.approx(losses("eq3"), rel=1e-5)  # same masks, same weights, same validation
    assert "phase" not in metrics(tmp_path, "wsd_plain")[1]


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--mask-schedule", "wsd", "--use-block-curriculum", "--wsd-block-sizes-up", "1,3,16"],
            r"\[3\] do not divide --seq-len 16",
        ),
        (["--use-block-curriculum"], "pass both"),
        (["--mask-schedule", "wsd", "--use-block-curriculum", "--wsd-phase-ratios", "0.5,0.5,0.5"], "summing to 1"),
        (["--variable-length-prob", "2"], r"--variable-length-prob must lie in \[0, 1\]"),
    ],
)
def test_bad_llada2_flags_are_explained(corpus, tmp_path, flags, message):
    with pytest.raises(NanoLladaError, match=message):
        run(corpus, tmp_path, "bad", "--max-iters", "2", *flags)
    assert not (tmp_path / "bad.pt").exists()


def test_sft_switches_run_through_the_cli(tmp_path, capsys):
    import json as _json

    from scripts.train import train_sft_diffusion

    rows = [
        {
            "conversations": [
                {"role": "user", "content": f"第{k}个问题是什么？"},
                {"role": "assistant", "content": "答案" * (1 + k % 3)},
            ]
        }
        for k in range(40)
    ]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(_json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    common = [
        "--data",
        str(data),
        "--tokenizer-dir",
        ".",
        "--save-dir",
        str(tmp_path),
        "--hidden-size",
        "64",
        "--num-hidden-layers",
        "2",
        "--num-attention-heads",
        "4",
        "--max-seq-len",
        "48",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--eval-interval",
        "3",
        "--eval-batches",
        "1",
        "--val-fraction",
        "0.1",
        "--device",
        "cpu",
    ]
    summary = train_sft_diffusion.main(
        [
            *common,
            "--run-name",
            "blk",
            "--block-size",
            "8",
            "--mask-ratio-min",
            "0.3",
            "--mask-ratio-max",
            "0.8",
            "--complementary-masking",
            "--cap-weight",
            "0.1",
        ]
    )
    assert summary["step"] == 3
    assert read_checkpoint(tmp_path / "blk_state_dict.pt").extra["block_diffusion"]["block_size"] == 8
    # every SFT decoding path decodes a block-trained checkpoint block-causally with its block size
    from scripts.eval import eval_sft_one_prompt
    from scripts.serve import load_engine, parse_args

    answers = eval_sft_one_prompt.main(
        [
            "--prompt",
            "第1个问题是什么？",
            "--tokenizer-dir",
            ".",
            "--max-new-tokens",
            "12",
            "--diffusion-checkpoint",
            str(tmp_path / "blk_state_dict.pt"),
            "--device",
            "cpu",
        ]
    )
    assert (
        "decoding block-causally with block size 8" in capsys.readouterr().out
        and answers[0]["diffusion"]["forward_passes"] >= 1
    )
    engine = load_engine(
        parse_args(["--checkpoint", str(tmp_path / "blk_state_dict.pt"), "--tokenizer-dir", ".", "--device", "cpu"])
    )
    request = engine.parse({"messages": [{"role": "user", "content": "第2个问题是什么？"}], "max_tokens": 10})
    assert request.sampler.block_causal and request.sampler.block_size == 8 and request.sampler.gen_length == 10
    assert engine.complete(request, lambda text: None)[1] <= 10
    from scripts.common.serving import RequestError

    with pytest.raises(RequestError, match="steps 1 is fewer than the 2 blocks to decode"):  # the sampler's own check
        engine.parse({"messages": [{"role": "user", "content": "第2个问题是什么？"}], "max_tokens": 10, "steps": 1})
    with pytest.raises(NanoLladaError, match="mask-ratio band"):
        train_sft_diffusion.main([*common, "--run-name", "bad", "--mask-ratio-min", "0.9", "--mask-ratio-max", "0.2"])


def test_random_length_crops_whole_batches_to_a_block_multiple(corpus, tmp_path, monkeypatch):
    """--variable-length-prob 1: every training batch is cropped (no PAD is ever attended to); under the block
    curriculum the crop is a multiple of the step's block size, so block diffusion always sees whole blocks."""
    widths = []
    original = diffusion.diffusion_loss

    def spy(model, rows, rng, mask_id, objective, maskable=None, doc_ids=None):
        if model.training:
            widths.append((rows.shape[1], objective.block_size))
            assert not (rows == 0).any()
        return original(model, rows, rng, mask_id, objective, maskable, doc_ids)

    monkeypatch.setattr(diffusion, "diffusion_loss", spy)
    flags = ["--mask-schedule", "wsd", "--use-block-curriculum", "--wsd-block-sizes-up", "4,16"]
    run(corpus, tmp_path, "cropped", "--max-iters", "6", "--variable-length-prob", "1", *flags)
    assert len(widths) == 6 and any(width < 16 for width, _ in widths)
    assert all(width % (block or 1) == 0 for width, block in widths)
