"""The AR-to-diffusion conversion through its entry point: what --init-from-minimind does by default, its options
(--logit-shift, --block-size, --position-masking), and the block size SFT inherits."""

import pytest
from conftest import TINY_MODEL, sample_subset

from model.checkpoint import read_checkpoint
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from scripts.common.pipeline import cli
from scripts.train import diffusion, train_pretrain, train_sft_diffusion

ROWS = {"pretrain": 300, "pretrain_val": 20, "sft_train": 40, "sft_val": 8}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    sample = sample_subset(tmp_path_factory.mktemp("sample"), ROWS)
    out = tmp_path_factory.mktemp("weights")
    common = [
        *cli(data=sample["pretrain"], tokenizer_dir=".", save_dir=out, **TINY_MODEL, device="cpu", seq_len=32),
        *cli(batch_size=4, max_iters=3, warmup_steps=1, eval_interval=3, eval_batches=1, val_fraction=0.05),
    ]
    train_pretrain.main([*common, "--run-name", "ar"])
    return sample, out, common


def convert(setup, name: str, *flags: str) -> object:
    _, out, common = setup
    argv = ["--train", *common, "--run-name", name, "--init-from-minimind", str(out / "ar_state_dict.pt"), *flags]
    diffusion.main(argv)
    return read_checkpoint(out / f"{name}_state_dict.pt")


def test_the_default_conversion_is_written_into_the_checkpoint(setup):
    checkpoint = convert(setup, "default")
    ar = read_checkpoint(setup[1] / "ar_state_dict.pt")
    assert checkpoint.config.logit_shift is diffusion.CONVERSION_LOGIT_SHIFT and not ar.config.logit_shift
    assert trained_block_size(checkpoint.extra) is None  # the conversion's default attention is bidirectional
    assert checkpoint.extra["diffusion"]["logit_shift"] is checkpoint.config.logit_shift


def test_conversion_options(setup):
    plain = convert(setup, "plain", "--no-logit-shift", "--block-size", "0")
    assert not plain.config.logit_shift and trained_block_size(plain.extra) is None
    blocks = convert(setup, "blocks", "--logit-shift", "--block-size", "8", "--position-masking", "1")
    assert blocks.config.logit_shift and trained_block_size(blocks.extra) == 8
    assert blocks.extra["diffusion"]["position_masking"] == 1.0


def test_sft_keeps_the_block_size_of_a_block_trained_model(setup):
    sample, out, _ = setup
    sft = [
        *cli(data=sample["sft_train"], eval_data=sample["sft_val"], tokenizer_dir=".", save_dir=out, device="cpu"),
        *cli(max_seq_len=96, batch_size=4, max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1),
    ]
    if not (out / "blocks_state_dict.pt").exists():
        convert(setup, "blocks", "--logit-shift", "--block-size", "8")
    train_sft_diffusion.main([*sft, *cli(run_name="sft_inherit", load_from=out / "blocks_state_dict.pt")])
    train_sft_diffusion.main([*sft, *cli(run_name="sft_bidir", load_from=out / "blocks_state_dict.pt", block_size=0)])
    inherit, bidirectional = (read_checkpoint(out / f"{n}_state_dict.pt") for n in ("sft_inherit", "sft_bidir"))
    assert trained_block_size(inherit.extra) == 8 and inherit.extra["sft_objective"]["block_size"] == 8
    assert trained_block_size(bidirectional.extra) is None and inherit.config.logit_shift


def test_conflicting_or_changed_conversion_flags_are_refused(setup):
    with pytest.raises(NanoLladaError, match="--use-block-curriculum"):
        convert(setup, "both", "--block-size", "8", "--mask-schedule", "wsd", "--use-block-curriculum")
    with pytest.raises(NanoLladaError, match="does not divide"):
        convert(setup, "odd", "--block-size", "5")
    if not (setup[1] / "plain.pt").exists():
        convert(setup, "plain", "--no-logit-shift", "--block-size", "0")
    with pytest.raises(NanoLladaError, match="logit_shift=False"):
        convert(setup, "plain", "--logit-shift", "--block-size", "0", "--resume")


def test_the_seed_diffusion_command_converts_with_the_default():
    """The README's step 3 (the project's seed command), parsed as written: logit shift, bidirectional."""
    argv = (
        "--train --use-tokenizer --tokenizer-dir . --data ./dataset/pretrain_hq.jsonl --jsonl-field text --seq-len 256 "
        "--hidden-size 512 --num-hidden-layers 8 --num-attention-heads 8 --inference-rope-scaling --learning-rate 4e-4 "
        "--lr-schedule wsd --warmup-steps 2000 --lr-stable-ratio 0.4 --min-lr-ratio 0.025 --mask-schedule iid_t "
        "--variable-length-prob 0.01 --iid-mask-eps 1e-3 --weight-decay 0.1 --repeat-penalty-weight 0 "
        "--init-from-minimind weights/minimind_pretrain_state_dict.pt --run-name diffusion_from_ar_eq3 "
        "--early-stop-patience 5 --early-stop-min-delta 0.001 --max-iters 40000 --batch-size 128"
    ).split()
    own = diffusion.settings(argv).own
    assert own.logit_shift is None and diffusion.CONVERSION_LOGIT_SHIFT  # None: the conversion's default
    assert not own.block_size and "logit shift" in diffusion.describe_conversion(own, True)
    assert "bidirectional attention" in diffusion.describe_conversion(own, True)


def test_the_report_names_the_default_conversion_by_its_flags():
    """report_experiments' DEFAULT_CONVERSION runs with explicit flags; they must be what no flags give."""
    from scripts import report_experiments

    flags = report_experiments.CONVERSIONS[report_experiments.DEFAULT_CONVERSION]
    args = diffusion.parse_args(["--train", "--init-from-minimind", "ar.pt", *flags])
    assert args.logit_shift is diffusion.CONVERSION_LOGIT_SHIFT
    assert not args.block_size and args.position_masking == 0  # bidirectional, as with no flags
