"""Joint AR + diffusion training (DiffusionObjective.ar_loss_weight, model/objectives/ar_loss.py): the loss is its
definition, weight 0 changes nothing, and a jointly trained checkpoint is accepted wherever an AR model is."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MASK_ID, TINY_MODEL, lively_model, sample_subset, token_rows

from model.checkpoint import (
    as_ar,
    build_model,
    check_compatible,
    decodes_causally,
    joint_record,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from model.errors import NanoLladaError
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.tokenizer import load_tokenizer, tokenizer_identity
from scripts.common.pipeline import cli
from scripts.train import diffusion, train_pretrain, train_sft_diffusion


def shifted_model(tiny_config):
    tiny_config.logit_shift = True
    return lively_model(tiny_config)


def hand_ar_loss(model, ids, weights, per_row, doc_ids=None):
    """The causal next-token NLL from the full logits, written out: position j scored from the causal output at
    j - 1, within its document, weighted c_j."""
    L = ids.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, :, None] == doc_ids[:, None, :])
        logits = torch.stack([model(ids[b : b + 1], attention=allowed[b][None, None])[0] for b in range(len(ids))])
    else:
        logits = model(ids, attention="causal")
    nll = -F.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    scored = nll * weights[:, 1:].double()
    if per_row:
        return (scored.sum(1) / weights.sum(1).double()).mean()
    return scored.sum() / weights.sum().double()


@pytest.mark.parametrize("setting", ["pretraining", "documents", "sft_rows", "blocks"])
def test_the_joint_loss_is_the_diffusion_loss_plus_w_times_the_hand_computed_ar_loss(tiny_config, setting):
    model, ids, w = shifted_model(tiny_config), token_rows(1), 0.3
    maskable, doc_ids, objective = None, None, DiffusionObjective()
    weights = torch.ones_like(ids, dtype=torch.float)
    if setting == "documents":
        doc_ids = (torch.arange(16)[None, :] >= torch.tensor([[5], [9], [16], [2]])).long()
    if setting == "sft_rows":  # a clean prompt, answers of different lengths, the EOS padding weighted 0.1
        maskable = torch.arange(16)[None, :] >= torch.tensor([[6], [10], [3], [12]])
        ids[:, 13:] = 2
        objective = DiffusionObjective(normalization="row", padding_weight=0.1)
        weights = maskable.float()
        weights[:, 14:] = 0.1  # the EOS padding after each answer's closing EOS at 13
    if setting == "blocks":
        objective = DiffusionObjective(block_size=4, complementary=True)
    weights[:, 0] = 0  # a shifted model never predicts a row's first token
    joint_objective = DiffusionObjective(**{**objective.__dict__, "ar_loss_weight": w})
    with torch.no_grad():
        plain, joint = (
            diffusion_loss(model, ids, torch.Generator().manual_seed(5), TINY_MASK_ID, o, maskable, doc_ids)
            for o in (objective, joint_objective)
        )
        expected = hand_ar_loss(model, ids, weights, objective.normalization == "row", doc_ids)
    assert float(joint - plain) == pytest.approx(w * float(expected), rel=1e-5)
    assert float(expected) > 1.0  # a real loss, not a vanishing term


def test_weight_zero_is_todays_loss_bit_for_bit_and_runs_one_forward(tiny_config):
    model = shifted_model(tiny_config)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    losses = [
        diffusion_loss(model, token_rows(2), torch.Generator().manual_seed(3), TINY_MASK_ID, objective)
        for objective in (DiffusionObjective(), DiffusionObjective(ar_loss_weight=0.0))
    ]
    assert torch.equal(losses[0], losses[1]) and len(calls) == 2
    diffusion_loss(model, token_rows(2), torch.Generator(), TINY_MASK_ID, DiffusionObjective(ar_loss_weight=0.5))
    assert len(calls) == 4  # the diffusion forward and one causal forward


def test_the_ar_term_needs_a_shifted_model_and_a_nonnegative_weight(tiny_config):
    model = lively_model(tiny_config)
    with pytest.raises(NanoLladaError, match="--logit-shift"):
        diffusion_loss(model, token_rows(0), torch.Generator(), TINY_MASK_ID, DiffusionObjective(ar_loss_weight=1))
    with pytest.raises(NanoLladaError, match="ar_loss_weight"):
        DiffusionObjective(ar_loss_weight=-0.1)


def test_a_joint_checkpoint_round_trips_and_loads_as_the_ar_model_it_is(tiny_config, tmp_path):
    model, tokenizer = shifted_model(tiny_config), load_tokenizer(".")
    config = model.config
    config.vocab_size = len(tokenizer)
    model = lively_model(config)
    ids = torch.randint(3, 6000, (2, 12))
    for name, record in (("joint", joint_record(0.3)), ("plain", joint_record(0.0))):
        save_checkpoint(tmp_path / f"{name}.pt", "diffusion", config, model, tokenizer_identity(tokenizer), **record)
    joint, plain = read_checkpoint(tmp_path / "joint.pt"), read_checkpoint(tmp_path / "plain.pt")
    assert joint.extra["joint"] == {"ar_loss_weight": 0.3} and "joint" not in plain.extra
    assert decodes_causally(joint) and not decodes_causally(plain)
    ar = check_compatible(joint, "joint.pt", "ar", tokenizer, ".")
    assert ar.kind == "ar" and not ar.config.logit_shift and ar.config.logit_shift != joint.config.logit_shift
    ar_model = build_model(ar).eval()
    assert torch.equal(ar_model(ids, attention="causal"), model(ids, attention="causal"))
    assert check_compatible(joint, "joint.pt", "diffusion", tokenizer, ".").kind == "diffusion"
    loaded, loaded_config = load_model(tmp_path / "joint.pt", kind="ar")
    assert not loaded_config.logit_shift and torch.equal(loaded(ids), model(ids, attention="causal"))
    with pytest.raises(NanoLladaError, match="expected ar"):
        load_model(tmp_path / "plain.pt", kind="ar")
    with pytest.raises(NanoLladaError, match="not ar"):
        check_compatible(plain, "plain.pt", "ar", tokenizer, ".")
    unshifted = as_ar(joint)  # an unshifted diffusion model trained jointly would have two heads in one: refused
    unshifted.kind = "diffusion"
    assert not decodes_causally(unshifted)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sample = sample_subset(tmp_path_factory.mktemp("sample"), {"pretrain": 300, "sft_train": 40, "sft_val": 8})
    out = tmp_path_factory.mktemp("weights")
    common = [
        *cli(data=sample["pretrain"], tokenizer_dir=".", save_dir=out, **TINY_MODEL, device="cpu", seq_len=32),
        *cli(batch_size=4, max_iters=3, warmup_steps=1, eval_interval=3, eval_batches=1, val_fraction=0.05),
    ]
    train_pretrain.main([*common, "--run-name", "ar"])
    parent = ["--train", *common, "--init-from-minimind", str(out / "ar_state_dict.pt")]
    return sample, out, parent


def test_weight_zero_conversion_equals_todays_in_losses_and_parameters(runs):
    _, out, parent = runs
    today = diffusion.main([*parent, "--run-name", "today"])
    zero = diffusion.main([*parent, "--run-name", "zero", "--ar-loss-weight", "0"])
    joint = diffusion.main([*parent, "--run-name", "joint", "--ar-loss-weight", "0.3"])
    a, b, c = (read_checkpoint(out / f"{n}_state_dict.pt") for n in ("today", "zero", "joint"))
    assert today["best_val"] == zero["best_val"] != joint["best_val"]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert not all(torch.equal(a.state_dict[k], c.state_dict[k]) for k in a.state_dict)
    assert "joint" not in b.extra and c.extra["joint"] == {"ar_loss_weight": 0.3}


def test_a_resumed_run_keeps_its_ar_loss_weight(runs):
    """Changing the weight mid-run would turn the rest of it into another objective: refused, naming both values."""
    _, out, parent = runs
    diffusion.main([*parent, "--run-name", "pinned", "--ar-loss-weight", "0.3"])
    more = [*parent, "--run-name", "pinned", "--resume", "--max-iters", "4"]
    with pytest.raises(NanoLladaError, match=r"--ar-loss-weight 0.0 \(checkpoint: 0.3\)"):
        diffusion.main(more)
    assert diffusion.main([*more, "--ar-loss-weight", "0.3"])["step"] == 4


def test_ar_entry_points_accept_a_jointly_trained_checkpoint(runs, tmp_path):
    from scripts.eval import eval_minimind
    from scripts.train import train_sft_minimind

    sample, out, parent = runs
    if not (out / "joint_state_dict.pt").exists():
        diffusion.main([*parent, "--run-name", "joint", "--ar-loss-weight", "0.3"])
    eval_minimind.main(
        [
            "--checkpoint",
            str(out / "joint_state_dict.pt"),
            "--tokenizer-dir",
            ".",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
        ]
    )
    sft = [
        *cli(data=sample["sft_train"], eval_data=sample["sft_val"], tokenizer_dir=".", save_dir=out, device="cpu"),
        *cli(max_seq_len=96, batch_size=4, max_steps=2, warmup_steps=1, eval_interval=2, eval_batches=1),
    ]
    train_sft_minimind.main([*sft, *cli(run_name="ar_sft", load_from=out / "joint_state_dict.pt")])
    written = read_checkpoint(out / "ar_sft_state_dict.pt")
    assert written.kind == "ar" and not written.config.logit_shift
    train_sft_diffusion.main(
        [*sft, *cli(run_name="joint_sft", load_from=out / "joint_state_dict.pt", ar_loss_weight=0.3)]
    )
    joint_sft = read_checkpoint(out / "joint_sft_state_dict.pt")
    assert (
        joint_sft.extra["joint"] == {"ar_loss_weight": 0.3}
        and joint_sft.extra["sft_objective"]["ar_loss_weight"] == 0.3
    )
    assert decodes_causally(joint_sft)


def test_the_hf_export_of_a_joint_checkpoint_loads_as_a_causal_lm_too(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.config import preset
    from scripts import export_hf

    tokenizer = load_tokenizer(".")
    model = lively_model(preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=128, logit_shift=True))
    checkpoint = tmp_path / "joint.pt"
    save_checkpoint(checkpoint, "diffusion", model.config, model, tokenizer_identity(tokenizer), **joint_record(0.3))
    export_hf.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--tokenizer-dir", "."])
    causal = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(3, 6000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(causal(ids).logits, model(ids, attention="causal"), atol=1e-5, rtol=0)
    back = read_checkpoint(tmp_path / "hf")
    assert back.kind == "diffusion" and back.config.logit_shift and decodes_causally(back)


def test_the_two_decoders_of_a_joint_checkpoint_through_their_entry_points(runs):
    from scripts.eval import eval_diffusion, eval_joint

    sample, out, parent = runs
    joint = out / "joint_state_dict.pt"
    if not joint.exists():
        diffusion.main([*parent, "--run-name", "joint", "--ar-loss-weight", "0.3"])
    flags = ["--tokenizer-dir", ".", "--device", "cpu"]
    result = eval_diffusion.main(
        [
            *flags,
            "--checkpoint",
            str(joint),
            "--decoding",
            "speculative",
            "--block-length",
            "4",
            "--max-new-tokens",
            "12",
        ]
    )
    assert len(result["sample"]["tokens"]) <= 12 and result["sample"]["nfe"] >= 1
    scores = eval_joint.main(
        [*flags, "--reference", str(out / "ar_state_dict.pt"), "--checkpoint", str(joint)]
        + cli(eval_data=sample["pretrain"], seq_len=32, eval_batch_size=4, eval_max_batches=1, mc_samples=2)
        + cli(prompts=2, prompt_tokens=4, new_tokens=12, draft_length=3)
    )
    reference, converted = scores["likelihoods"]
    assert reference["diffusion"] is None and reference["ar_delta"] == (0.0, 0.0)
    assert (
        converted["ar"]["row_tokens"] == reference["ar"]["row_tokens"] and converted["diffusion"]["nll_per_token"] > 0
    )
    assert [row["identical"] for row in scores["speculation"]] == [True, True, True]  # every drafter


def test_the_server_serves_a_joint_checkpoint_as_ar_when_asked(tmp_path):
    from model.config import preset
    from scripts import serve

    tokenizer = load_tokenizer(".")
    model = lively_model(preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=128, logit_shift=True))
    for name, weight in (("joint", 0.3), ("plain", 0.0)):
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, "diffusion", model.config, model, tokenizer_identity(tokenizer), **joint_record(weight))
    engine = serve.load_engine(serve.parse_args(["--checkpoint", str(tmp_path / "joint.pt"), "--as-ar"]))
    assert engine.kind == "ar" and not engine.model.config.logit_shift
    engine.close()
    engine = serve.load_engine(serve.parse_args(["--checkpoint", str(tmp_path / "joint.pt")]))
    assert engine.kind == "diffusion"
    engine.close()
    with pytest.raises(NanoLladaError, match="not ar"):
        serve.load_engine(serve.parse_args(["--checkpoint", str(tmp_path / "plain.pt"), "--as-ar"]))
