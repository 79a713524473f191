"""End-to-end: the LLaDA 2.0 switches of scripts.train.diffusion, the merge and block-causal eval, on a tiny config."""

import json

import pytest
from conftest import TINY_MODEL, sample_subset

from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from scripts.common.pipeline import cli
from scripts.common.training import diffusion_pretraining
from scripts.eval import eval_diffusion
from scripts.train import diffusion, merge_checkpoints

TINY = [
    *cli(**TINY_MODEL, max_position_embeddings=64, seq_len=16, device="cpu"),
    *cli(batch_size=4, val_fraction=0.05, eval_batches=2, log_interval=1, warmup_steps=1, learning_rate=3e-3),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first documents of the offline sample corpus: enough rows for a few steps, quick to tokenize."""
    return sample_subset(tmp_path_factory.mktemp("llada2"), {"pretrain": 120})["pretrain"]


def run(corpus, save_dir, name, *flags):
    return diffusion.main(
        [*cli("--train", tokenizer_dir=".", data=corpus, save_dir=save_dir, run_name=name), *TINY, *flags]
    )


def metrics(save_dir, name):
    return [json.loads(line) for line in (save_dir / f"{name}_metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wsd_run(corpus, tmp_path_factory):
    """Ten steps of the WSD block curriculum with cosine time weights, the document mask and the top-2 kept."""
    save_dir = tmp_path_factory.mktemp("wsd")
    curriculum = cli(
        "--use-block-curriculum", mask_schedule="wsd", wsd_block_sizes_up="1,4,16", wsd_phase_ratios="0.3,0.3,0.4"
    )
    weighting = cli("--time-weighted-loss", "--use-doc-attention-mask", inference_block_size=4)
    schedule = cli(keep_top_k=2, max_iters=10, eval_interval=3)
    return run(corpus, save_dir, "wsd", *curriculum, *weighting, *schedule), save_dir


def test_wsd_curriculum_walks_its_phases_and_blocks_and_stores_its_settings(wsd_run):
    summary, save_dir = wsd_run
    records = metrics(save_dir, "wsd")
    steps = [r for r in records if "loss" in r]
    warmup, stable, decay = [("warmup", 1), ("warmup", 4), ("warmup", 16)], [("stable", 16)] * 3, [("decay", 16)] * 2
    assert [(r["phase"], r["block"]) for r in steps] == warmup + stable + decay + [("decay", 8), ("decay", 4)]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert vals[-1] < vals[0]  # the MDLM validation loss fell
    full = read_checkpoint(save_dir / "wsd.pt")
    assert full.extra["diffusion"]["block_curriculum"]["sizes_down"] == [16, 8, 4]
    assert full.extra["diffusion"]["time_weight_schedule"] == "cosine" and full.extra["diffusion"]["doc_attention_mask"]
    assert summary["step"] == 10 and len(json.loads((save_dir / "wsd_topk.json").read_text())) == 2


def test_wsd_run_merges_its_top_k_and_decodes_block_causally_with_and_without_the_cache(wsd_run):
    _, save_dir = wsd_run
    merged = merge_checkpoints.main(cli(run_name="wsd", save_dir=save_dir, k=2))
    assert (save_dir / "wsd_merged.pt").exists() and len(merged["merged"]) == 2

    checkpoint = cli(checkpoint=save_dir / "wsd.pt", tokenizer_dir=".", seq_len=16, device="cpu")
    sample = [*checkpoint, *cli("--no-early-stop", prompt="今天", max_new_tokens=8)]
    result = eval_diffusion.main(sample)
    assert result["sample"]["block_causal"]  # ended in the decay phase at block 4: decoded block-causally
    uncached = eval_diffusion.main([*sample, "--no-kv-cache"])
    assert uncached["sample"]["tokens"] == result["sample"]["tokens"]


def test_wsd_without_curriculum_and_linear_time_weight_is_llada_eq3(corpus, tmp_path):
    common = ["--max-iters", "2", "--eval-interval", "2"]
    run(corpus, tmp_path, "eq3", *common)
    linear_weights = cli("--time-weighted-loss", mask_schedule="wsd", time_weight_schedule="linear")
    run(corpus, tmp_path, "wsd_plain", *linear_weights, *common)

    def losses(name):
        return [r.get("loss", r.get("val_loss")) for r in metrics(tmp_path, name) if "tokens_per_s" not in r]

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


def sft_flags(save_dir):
    """A tiny diffusion SFT run on 40 short question/answer conversations written to save_dir."""
    rows = [
        {
            "conversations": [
                {"role": "user", "content": f"第{k}个问题是什么？"},
                {"role": "assistant", "content": "答案" * (1 + k % 3)},
            ]
        }
        for k in range(40)
    ]
    data = save_dir / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return [
        *cli(data=data, tokenizer_dir=".", save_dir=save_dir, **TINY_MODEL, device="cpu"),
        *cli(max_seq_len=48, batch_size=4, max_steps=3, eval_interval=3, eval_batches=1, val_fraction=0.1),
    ]


def test_block_sft_switches_run_through_the_cli_and_every_sft_path_decodes_block_causally(tmp_path, capsys):
    from scripts.common.serving.engine import RequestError
    from scripts.eval import eval_sft_one_prompt
    from scripts.serve import load_engine, parse_args
    from scripts.train import train_sft_diffusion

    block_sft = cli(
        "--complementary-masking", run_name="blk", block_size=8, mask_ratio_min=0.3, mask_ratio_max=0.8, cap_weight=0.1
    )
    normalization = cli(loss_normalization="batch", eos_padding_weight=0.5, eos_padding_length=2)
    summary = train_sft_diffusion.main([*sft_flags(tmp_path), *block_sft, *normalization])
    assert summary["step"] == 3
    checkpoint = tmp_path / "blk_state_dict.pt"
    extra = read_checkpoint(checkpoint).extra
    assert extra["block_diffusion"]["block_size"] == 8
    assert extra["sft_objective"]["normalization"] == "batch" and extra["sft_objective"]["padding_weight"] == 0.5
    assert extra["sft_eos_padding_length"] == 2
    # every SFT decoding path decodes a block-trained checkpoint block-causally with its block size
    answers = eval_sft_one_prompt.main(
        cli(
            prompt="第1个问题是什么？",
            tokenizer_dir=".",
            max_new_tokens=12,
            diffusion_checkpoint=checkpoint,
            device="cpu",
        )
    )
    assert "decoding block-causally with block size 8" in capsys.readouterr().out
    assert answers[0]["diffusion"]["forward_passes"] >= 1
    engine = load_engine(parse_args(cli(checkpoint=checkpoint, tokenizer_dir=".", device="cpu")))
    messages = [{"role": "user", "content": "第2个问题是什么？"}]
    request = engine.parse({"messages": messages, "max_tokens": 10})
    assert request.sampler.block_causal and request.sampler.block_size == 8 and request.sampler.gen_length == 10
    assert engine.complete(request, lambda text: None)[1] <= 10
    with pytest.raises(RequestError, match="steps 1 is fewer than the 2 blocks to decode"):  # the sampler's own check
        engine.parse({"messages": messages, "max_tokens": 10, "steps": 1})


def test_an_inverted_mask_ratio_band_is_explained(tmp_path):
    from scripts.train import train_sft_diffusion

    with pytest.raises(NanoLladaError, match="mask-ratio band"):
        train_sft_diffusion.main([*sft_flags(tmp_path), *cli(run_name="bad", mask_ratio_min=0.9, mask_ratio_max=0.2)])
    with pytest.raises(NanoLladaError, match="--eos-padding-weight must be in"):
        train_sft_diffusion.main([*sft_flags(tmp_path), *cli(run_name="bad", eos_padding_weight=2)])
    with pytest.raises(NanoLladaError, match="--eos-padding-length must be >= 0"):
        train_sft_diffusion.main([*sft_flags(tmp_path), *cli(run_name="bad", eos_padding_length=-1)])


def test_random_length_crops_whole_batches_to_a_block_multiple(corpus, tmp_path, monkeypatch):
    """--variable-length-prob 1: every training batch is cropped (no PAD is ever attended to); under the block
    curriculum the crop is a multiple of the step's block size, so block diffusion always sees whole blocks."""
    widths = []
    original = diffusion_pretraining.diffusion_loss

    def spy(model, rows, rng, mask_id, objective, maskable=None, doc_ids=None):
        if model.training:
            widths.append((rows.shape[1], objective.block_size))
            assert not (rows == 0).any()
        return original(model, rows, rng, mask_id, objective, maskable, doc_ids)

    monkeypatch.setattr(diffusion_pretraining, "diffusion_loss", spy)
    flags = ["--mask-schedule", "wsd", "--use-block-curriculum", "--wsd-block-sizes-up", "4,16"]
    run(corpus, tmp_path, "cropped", "--max-iters", "6", "--variable-length-prob", "1", *flags)
    assert len(widths) == 6 and any(width < 16 for width, _ in widths)
    assert all(width % (block or 1) == 0 for width, block in widths)
