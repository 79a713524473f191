"""The speed card's figures: content counts stop at EOS, generative perplexity is the AR model's own NLL, quality is
read from the decoded outputs; and the two decoding levers it adds (a shorter canvas, rows finishing at their EOS)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import NanoLladaError
from model.inference.remasking import _factor_count, pad_finished_rows
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate, strip_after_eos
from model.tokenizer import EOS_ID, encode, load_tokenizer
from model.transformer import Transformer
from scripts.common.bench.card import CardSettings, Pair, Run, Workload, ar_run, card_row, decoding_modes
from scripts.common.bench.quality import generative_perplexity, unigram_entropy

MASK = 100  # the tiny config's last id


def test_content_stops_at_the_first_eos():
    assert strip_after_eos([5, 6, EOS_ID, 7, EOS_ID], EOS_ID) == [5, 6]
    assert strip_after_eos([5, 6], EOS_ID) == [5, 6] and strip_after_eos([EOS_ID, 5], EOS_ID) == []


def test_content_tokens_per_second_counts_only_tokens_before_eos(tiny_config):
    ar = Transformer(tiny_config).eval()
    written = [[4, 5, 6, EOS_ID, 9, 9], [7, EOS_ID, EOS_ID, EOS_ID]]  # what two rows of a decoder wrote
    run = Run()
    run.add([strip_after_eos(ids, EOS_ID) for ids in written], seconds=2.0, first=0.5, forwards=6)
    row = card_row(Workload("continuation", 6, [[1, 3], [1, 4]]), 2, "x", run, ar, tokenizer=None)
    assert row["content_tokens"] == 4 and row["content_tokens_per_s"] == 2.0 and row["mean_content_length"] == 2
    assert row["tokens_per_forward"] == 2 / 6  # per row, per forward of the batch


def test_ar_run_outputs_hold_no_eos_and_count_every_forward(tiny_config):
    torch.manual_seed(0)
    ar = Transformer(tiny_config).eval()
    with torch.no_grad():
        ar.lm_head.weight[EOS_ID] = ar.lm_head.weight[7] * 1.01  # EOS competes with a common token
    run = ar_run(ar, [[1, 3, 4], [1, 5]], 8, 1, torch.device("cpu"), "float32", MASK)
    assert all(EOS_ID not in ids for ids in run.outputs) and run.batches == 2
    assert run.forward_passes == sum(min(len(ids) + 1, 8) for ids in run.outputs)  # one per token, EOS included


def test_generative_perplexity_is_the_ar_models_own_nll(tiny_config):
    torch.manual_seed(1)
    ar = Transformer(tiny_config).eval()
    prompts, outputs = [[1, 9, 10], [1, 11]], [[12, 13, 14], [15]]
    nll, count = 0.0, 0
    for prompt, output in zip(prompts, outputs):
        ids = torch.tensor([prompt + output])
        with torch.no_grad():
            logits = ar(ids, attention="causal")[0, :-1]
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="none")[len(prompt) - 1 :].sum().item()
        count += len(output)
    assert generative_perplexity(ar, prompts, outputs) == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert generative_perplexity(ar, prompts, [[], []]) is None


def test_unigram_entropy_sees_repetition():
    assert unigram_entropy([5, 5, 5, 5]) == 0 and unigram_entropy([]) == 0
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))


def test_quality_is_read_from_the_decoded_outputs_not_the_reference(tiny_config):
    """Accuracy parses what was decoded; perplexity scores the decoded ids (a reference answer plays no part)."""
    tokenizer = load_tokenizer(".")
    torch.manual_seed(2)
    ar = Transformer(tiny_config.__class__(**{**tiny_config.to_dict(), "vocab_size": 6401})).eval()
    prompts = [[1, 20, 21], [1, 22, 23]]
    decoded = [encode(tokenizer, "正面"), encode(tokenizer, "负面")]
    run = Run()
    run.add(decoded, seconds=1.0, first=0.1, forwards=2)
    workload = Workload("classification", 8, prompts, labels=["正面", "正面"])
    row = card_row(workload, 1, "x", run, ar, tokenizer)
    assert row["accuracy"] == 0.5 and row["unparseable"] == 0
    assert row["generative_perplexity"] == pytest.approx(generative_perplexity(ar, prompts, decoded))
    reference = [encode(tokenizer, "正面")] * 2
    assert row["generative_perplexity"] != pytest.approx(generative_perplexity(ar, prompts, reference))


class EosLeaning(nn.Module):
    """A tiny model whose EOS logit is raised: it writes EOS early and in the middle of blocks."""

    def __init__(self, inner, boost: float):
        super().__init__()
        self.inner, self.config, self.boost = inner, inner.config, boost

    def forward(self, ids, **kwargs):
        logits = self.inner(ids, **kwargs)
        logits[..., EOS_ID] += self.boost
        return logits

    def new_kv_cache(self, batch_size, max_length):
        return self.inner.new_kv_cache(batch_size, max_length)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("boost", [5.0, 20.0])
def test_finishing_at_eos_keeps_the_text_and_saves_forwards(tiny_config, cache, threshold, boost):
    from tests.conftest import lively_model

    torch.manual_seed(3)
    model = EosLeaning(lively_model(tiny_config), boost)
    prompt = torch.randint(3, MASK, (4, 5), generator=torch.Generator().manual_seed(0))
    sampler = DiffusionSamplerConfig(gen_length=16, steps=16, block_size=8, threshold=threshold, cache=cache)
    plain = diffusion_generate(model, prompt, sampler, MASK, EOS_ID)
    finished = diffusion_generate(model, prompt, DiffusionSamplerConfig(**{**sampler.__dict__, "finish_at_eos": True}),
                                  MASK, EOS_ID)  # fmt: skip
    texts = [strip_after_eos(row, EOS_ID) for row in plain.tokens.tolist()]
    assert texts == [strip_after_eos(row, EOS_ID) for row in finished.tokens.tolist()]
    assert finished.nfe <= plain.nfe and (finished.tokens != MASK).all()
    assert any(len(t) < 16 for t in texts)  # the EOS came early somewhere: the test exercises the finish
    if boost == 20.0 and threshold is None:  # every row writes EOS first: it stops long before its block's 8 steps
        assert finished.nfe < plain.nfe == 8


def test_pad_finished_rows_needs_every_position_before_the_eos():
    rows = torch.tensor([[4, EOS_ID, MASK, MASK], [MASK, EOS_ID, MASK, 5], [4, 5, MASK, MASK]])
    pad_finished_rows(rows, EOS_ID, MASK)
    assert rows.tolist() == [[4, EOS_ID, EOS_ID, EOS_ID], [MASK, EOS_ID, MASK, 5], [4, 5, MASK, MASK]]


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_a_lookahead_past_the_canvas_equals_the_whole_canvas(tiny_config, cache):
    from tests.conftest import lively_model

    model = lively_model(tiny_config)
    prompt = torch.randint(3, MASK, (2, 4), generator=torch.Generator().manual_seed(1))
    sampler = DiffusionSamplerConfig(gen_length=16, steps=16, block_size=4, threshold=0.5, cache=cache)
    whole = diffusion_generate(model, prompt, sampler, MASK)
    far = diffusion_generate(model, prompt, DiffusionSamplerConfig(**{**sampler.__dict__, "lookahead_blocks": 4}), MASK)
    near = diffusion_generate(
        model, prompt, DiffusionSamplerConfig(**{**sampler.__dict__, "lookahead_blocks": 1}), MASK
    )
    assert torch.equal(whole.tokens, far.tokens) and whole.nfe == far.nfe
    assert (near.tokens != MASK).all() and near.tokens.shape == whole.tokens.shape


def test_modes_compare_every_lever_and_block_trained_models_decode_block_causally():
    s = CardSettings(thresholds=(0.9, 0.5))
    modes = decoding_modes(128, s, None)
    assert modes["ar_kv_cache"] is None and modes["llada_baseline"].steps == 128
    assert modes["fast_0.5"].cache == "dual" and modes["fast_0.5"].finish_at_eos and modes["fast_0.5"].lookahead_blocks
    assert {"threshold_0.9", "threshold_0.9_prefix_cache", "threshold_0.9_dual_cache", "fast_0.9"} <= set(modes)
    assert modes["fast_factor_1"].commit_factor == 1 and modes["fast_2_per_step"].steps == 64
    blocky = decoding_modes(128, s, 32)
    assert all(m.block_causal and m.block_size == 32 and m.cache == "none" for m in blocky.values() if m)
    assert decoding_modes(8, s, None)["llada_baseline"].block_size == 8  # one block when 32 does not tile it


def test_a_pair_holds_models_of_the_same_shape(tiny_config):
    pair = Pair(Transformer(tiny_config), Transformer(replace(tiny_config, logit_shift=True)), {})
    assert pair.trained_block is None  # a logit shift is no change of shape
    for field, value in [("num_attention_heads", 2), ("num_key_value_heads", 1), ("intermediate_size", 256)]:
        with pytest.raises(NanoLladaError, match=f"differ in {field}"):
            Pair(Transformer(tiny_config), Transformer(replace(tiny_config, **{field: value})), {})


def test_the_factor_rule_commits_more_when_more_positions_are_confident():
    scores = torch.tensor([[0.9, 0.8, 0.3, float("-inf")], [0.6, 0.5, 0.4, 0.3]])
    assert _factor_count(scores, 1.0).tolist() == [2, 1]  # 2 x 0.1, 3 x 0.2 < 1 < 4 x 0.7; 2 x 0.4 < 1 < 3 x 0.5
    assert _factor_count(scores, 3.0).tolist() == [3, 3]  # a higher factor commits more


def test_the_new_levers_refuse_settings_that_mean_nothing():
    from model.errors import SettingError

    with pytest.raises(SettingError, match="commit_factor.*threshold"):
        DiffusionSamplerConfig(gen_length=8, steps=8, commit_factor=1.0).validate()
    with pytest.raises(SettingError, match="lookahead_blocks"):
        DiffusionSamplerConfig(gen_length=8, steps=8, lookahead_blocks=-1).validate()
