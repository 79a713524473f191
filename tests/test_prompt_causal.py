"""Prompt-causal diffusion models (model/prompt_causal.py): the mask, the exact first-token term of the SFT loss, the
sampler's exact prompt cache, the likelihoods and DPO's answer scores, and the SFT entry point that writes one."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import UniformModel, decodes_something, lively_model, sample_subset

from model.checkpoint import read_checkpoint, save_checkpoint
from model.config import preset
from model.errors import NanoLladaError
from model.inference.likelihood import conditional_log_likelihood_batch
from model.inference.padding import left_pad
from model.inference.reference_sampler import reference_generate
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.preference import MaskDraws, diffusion_answer_elbo
from model.prompt_causal import prompt_causal_mask
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts.common.pipeline import cli
from scripts.train import train_sft_diffusion

PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 99], [44]]


def prompt_causal_model(tiny_config, logit_shift=True):
    return lively_model(replace(tiny_config, logit_shift=logit_shift, prompt_causal=True))


def test_the_mask_reads_the_prompt_causally_and_the_rest_everywhere():
    mask = prompt_causal_mask(torch.tensor([2, 1]), 4, keys=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_the_prompts_outputs_never_depend_on_the_answer(tiny_config):
    model = prompt_causal_model(tiny_config)
    ids = torch.randint(1, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 6:] = torch.randint(1, 100, (4,), generator=torch.Generator().manual_seed(1))
    mask = prompt_causal_mask(6, 10)
    a, b = model(ids, attention=mask), model(other, attention=mask)
    assert torch.allclose(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])
    assert torch.allclose(a[:, :6], model(ids[:, :6], attention="causal"), atol=1e-5)  # the AR reading


def test_a_one_token_answer_is_scored_exactly_on_every_draw(tiny_config):
    """Its prediction sits at the prompt's last position, which no mask reaches: the loss is log p(a | prompt) read
    causally, whatever the draw, including the draws that leave the token unmasked."""
    model = prompt_causal_model(tiny_config)
    ids = torch.tensor([[1, 17, 23, 40, 9]])
    maskable = torch.tensor([[0, 0, 0, 0, 1]]).bool()
    exact = -torch.log_softmax(model(ids[:, :4], attention="causal")[0, -1], -1)[9]
    objective = DiffusionObjective(normalization="row")
    for seed in range(6):
        loss = diffusion_loss(model, ids, torch.Generator().manual_seed(seed), 100, objective, maskable)
        assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    bidirectional = replace(model.config, prompt_causal=False)
    model.config = bidirectional
    loss = diffusion_loss(model, ids, torch.Generator().manual_seed(0), 100, objective, maskable)
    assert loss.item() != pytest.approx(exact.item(), rel=1e-3)


def test_a_row_without_a_prompt_is_the_bidirectional_loss(tiny_config):
    """Pretraining rows have no prompt: nothing is read causally and no term is exact (position 1 is predicted at
    position 0, which sees the whole noisy row), so the loss is the bidirectional model's, draw for draw."""
    model = prompt_causal_model(tiny_config)
    ids = torch.randint(1, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for prompt_causal in (True, False):
        model.config = replace(model.config, prompt_causal=prompt_causal)
        losses.append(diffusion_loss(model, ids, torch.Generator().manual_seed(3), 100, DiffusionObjective()).item())
    assert losses[0] == losses[1]


@pytest.mark.parametrize("denoising_weight", [1.0, 0.25])
def test_uniform_logits_give_ln_v_per_token_and_the_weight_scales_the_other_terms(denoising_weight):
    """With weight 1 the estimate is the NELBO per answer token (ln|V| under uniform logits); with w the first token
    counts once and the other n - 1 by w."""
    vocab, n, rows = 101, 6, 512
    model = UniformModel(vocab)
    model.config = SimpleNamespace(logit_shift=True, prompt_causal=True)
    ids = torch.randint(1, vocab - 1, (rows, 3 + n), generator=torch.Generator().manual_seed(0))
    maskable = torch.arange(3 + n)[None, :].expand(rows, -1) >= 3
    objective = DiffusionObjective(normalization="row", denoising_weight=denoising_weight)
    values = torch.tensor(
        [
            diffusion_loss(model, ids, torch.Generator().manual_seed(s), vocab - 1, objective, maskable).item()
            for s in range(8)
        ]
    )
    expected = math.log(vocab) * (1 + denoising_weight * (n - 1)) / n
    assert abs(values.mean().item() - expected) < 0.03 * expected


def test_the_denoising_weight_needs_a_prompt_causal_shifted_model(tiny_config):
    model = lively_model(replace(tiny_config, logit_shift=True))
    ids, maskable = torch.tensor([[1, 17, 23, 40, 9]]), torch.tensor([[0, 0, 0, 1, 1]]).bool()
    with pytest.raises(NanoLladaError, match="--prompt-causal"):
        diffusion_loss(model, ids, torch.Generator(), 100, DiffusionObjective(denoising_weight=0.5), maskable)
    with pytest.raises(NanoLladaError, match="denoising_weight"):
        DiffusionObjective(denoising_weight=0)
    model = prompt_causal_model(tiny_config)
    with pytest.raises(NanoLladaError, match="block"):
        diffusion_loss(model, ids, torch.Generator(), 100, DiffusionObjective(block_size=2), maskable)


@pytest.mark.parametrize("logit_shift", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {"block_size": None, "steps": 12},
        {"block_size": 4, "steps": 5},
        {"block_size": 6, "steps": 6, "cfg_scale": 1.5},
        {"block_size": 4, "steps": 12, "temperature": 0.8},
    ],
)
def test_the_prompt_cache_decodes_the_reference_tokens(tiny_config, logit_shift, options):
    """One causal prefill, then the answer columns only: the tokens of the full canvas under the mask every step."""
    model, mask_id = prompt_causal_model(tiny_config, logit_shift), tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (3, 5), generator=torch.Generator().manual_seed(1))
    sampler = DiffusionSamplerConfig(gen_length=12, stop_at_eos=False, **options)
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    reference = reference_generate(model, prompt, sampler, mask_id, generator())
    fast = diffusion_generate(model, prompt, sampler, mask_id, generator=generator())
    assert torch.equal(reference, fast.tokens) and decodes_something(reference)
    model.config = replace(model.config, prompt_causal=False)  # the same weights, read bidirectionally
    assert not torch.equal(reference_generate(model, prompt, sampler, mask_id, generator()), reference)


@pytest.mark.parametrize("options", [{}, {"threshold": 0.3}, {"cfg_scale": 1.0}])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_padded_prompts_decode_as_each_alone_and_ended_rows_leave(tiny_config, options, logit_shift):
    model, mask_id = prompt_causal_model(tiny_config, logit_shift), tiny_config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, **options)
    eos = int(diffusion_generate(model, torch.tensor([PROMPTS[2]]), sampler, mask_id).tokens[0, 1])
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    batched = diffusion_generate(model, ids, sampler, mask_id, eos_id=eos, prompt_lengths=lengths)
    alone = [diffusion_generate(model, torch.tensor([p]), sampler, mask_id, eos_id=eos).tokens for p in PROMPTS]
    assert torch.equal(batched.tokens, torch.cat(alone)) and decodes_something(batched.tokens)
    assert (batched.tokens[2, 4:] == eos).all()  # row 2 ended in its first block
    repadded = diffusion_generate(
        model, ids.masked_fill(ids == 0, 57), sampler, mask_id, eos_id=eos, prompt_lengths=lengths
    )
    assert torch.equal(repadded.tokens, batched.tokens)


def test_the_approximate_caches_and_block_causal_decoding_are_refused(tiny_config):
    model, mask_id = prompt_causal_model(tiny_config), tiny_config.vocab_size - 1
    for options in ({"cache": "prefix"}, {"block_causal": True}):
        sampler = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, **options)
        with pytest.raises(NanoLladaError, match="prompt causally"):
            diffusion_generate(model, torch.tensor([[1, 2, 3]]), sampler, mask_id)


def test_a_one_token_answers_likelihood_and_dpo_score_are_its_causal_log_probability(tiny_config):
    """The likelihoods read the prompt as the model does: a one-token answer's estimate is exact."""
    model, mask_id = prompt_causal_model(tiny_config), tiny_config.vocab_size - 1
    prompt, long_prompt = [1, 17, 23, 40], [1, 5, 6, 7, 8, 40]
    exact = torch.log_softmax(model(torch.tensor([prompt]), attention="causal")[0, -1], -1)
    (short, _), (longer, _) = conditional_log_likelihood_batch(model, prompt, [[9], [9, 12, 30]], mask_id, 4)
    assert short == pytest.approx(exact[9].item(), rel=1e-5) and longer < short
    # DPO's rows: prompts of different lengths, right padding; the one-token answer masked with weight 1
    rows = torch.tensor([prompt + [9, 0, 0, 0], long_prompt + [9, 12]])
    answer = torch.zeros(2, 8, dtype=torch.bool)
    answer[0, 4], answer[1, 6:] = True, True
    draws = MaskDraws(answer[None], answer[None].double())
    scores = diffusion_answer_elbo(model, rows, torch.tensor([5, 8]), draws, mask_id, answer_start=torch.tensor([4, 6]))
    assert scores[0].item() == pytest.approx(exact[9].item(), rel=1e-5)


def test_the_likelihood_scores_the_first_answer_token_exactly_and_stays_unbiased(tiny_config):
    """Answer [a, b] with exact-count draws: l = 1 masks a or b (weight 2), l = 2 both (weight 1). The NELBO is
    CE_a + CE_b(a visible) / 2 + CE_b(a masked) / 2; the exact first-token term keeps that mean, and only b's term
    varies from draw to draw."""
    model, mask_id = prompt_causal_model(tiny_config), tiny_config.vocab_size - 1
    prompt, (a, b) = [1, 17, 23, 40], (9, 12)
    attention = prompt_causal_mask(4, 6)

    def nll_b(first):
        logits = model(torch.tensor([prompt + [first, mask_id]]), attention=attention)
        return -torch.log_softmax(logits[0, 4], -1)[b].item()  # b is read at a's position

    ce_a = -torch.log_softmax(model(torch.tensor([prompt]), attention="causal")[0, -1], -1)[a].item()
    expected = ce_a + nll_b(a) / 2 + nll_b(mask_id) / 2
    estimates = [
        conditional_log_likelihood_batch(
            model, prompt, [[a, b]], mask_id, 64, generator=torch.Generator().manual_seed(s)
        )
        for s in range(8)
    ]
    means = torch.tensor([-mean for ((mean, _),) in estimates])
    assert abs(means.mean().item() - expected) < 4 * means.std().item() / math.sqrt(8) + 1e-6
    # one draw at a time: a's term is exactly ce_a, masked or not; b adds 2 CE_b(a visible), CE_b(a masked) or nothing
    singles = [
        -conditional_log_likelihood_batch(
            model, prompt, [[a, b]], mask_id, 1, generator=torch.Generator().manual_seed(s)
        )[0][0]
        - ce_a
        for s in range(16)
    ]
    allowed = torch.tensor([0.0, 2 * nll_b(a), nll_b(mask_id)])
    assert all((allowed - value).abs().min() < 1e-4 for value in singles)
    assert any(abs(value) < 1e-4 for value in singles)  # draws that mask only a: nothing but its exact term


def test_sft_reads_the_prompt_causally_by_default_and_a_resume_keeps_it(tmp_path):
    """A shifted model's SFT takes the first answer token's exact term and weighs the others 0.1; the config records
    the reading, and a resumed run may not change it (without the flag it keeps its own)."""
    tokenizer = load_tokenizer(".")
    sample = sample_subset(tmp_path, {"sft_train": 24, "sft_val": 8})
    config = preset("tiny", vocab_size=len(tokenizer), logit_shift=True)
    save_checkpoint(tmp_path / "start.pt", "diffusion", config, Transformer(config), tokenizer_identity(tokenizer))
    # fmt: off
    sft = cli(data=sample["sft_train"], eval_data=sample["sft_val"], tokenizer_dir=".", save_dir=tmp_path,
              device="cpu", max_seq_len=96, batch_size=4, max_steps=2, warmup_steps=1, eval_interval=2,
              eval_batches=1, load_from=tmp_path / "start.pt")
    # fmt: on
    train_sft_diffusion.main([*sft, "--run-name", "pc"])
    train_sft_diffusion.main([*sft, "--run-name", "bidi", "--no-prompt-causal"])
    pc, bidi = (read_checkpoint(tmp_path / f"{name}_state_dict.pt") for name in ("pc", "bidi"))
    assert pc.config.prompt_causal and pc.extra["sft_objective"]["denoising_weight"] == 0.1
    assert not bidi.config.prompt_causal and bidi.extra["sft_objective"]["denoising_weight"] == 1.0
    resume = [*sft, "--run-name", "pc", "--resume", "--max-steps", "3"]
    with pytest.raises(NanoLladaError, match=r"--prompt-causal False \(checkpoint: True\)"):
        train_sft_diffusion.main([*resume, "--no-prompt-causal"])
    assert train_sft_diffusion.main(resume)["step"] == 3
    assert read_checkpoint(tmp_path / "pc_state_dict.pt").config.prompt_causal
