"""Self-speculative decoding (model/inference/speculative.py): token for token the AR greedy output of the same
weights, for several draft lengths, prompt lengths and a batch, with the forward passes counted as they run."""

import pytest
import torch
from conftest import TINY_MASK_ID, decodes_something, lively_model

from model.errors import SettingError
from model.inference.ar import generate
from model.inference.speculative import SpeculativeConfig, speculative_generate

PROMPTS = [[1, 17, 33], [1, 5, 9, 60, 71, 4, 22, 90, 13], [7]]


def model_for(tiny_config, shifted: bool):
    tiny_config.logit_shift = shifted
    torch.manual_seed(3)
    return lively_model(tiny_config)


@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize(
    "k,steps,in_verify,redraft,context",
    [
        (1, 1, False, True, "cache"),
        (3, 1, True, True, "cache"),
        (4, 2, False, True, "full"),
        (8, 1, True, True, "full"),
        (8, 8, True, True, "cache"),
        (1, 1, True, False, "cache"),
        (5, 1, True, False, "cache"),
    ],
)
def test_every_prompt_gets_the_ar_greedy_output(tiny_config, shifted, k, steps, in_verify, redraft, context):
    model = model_for(tiny_config, shifted)
    config = SpeculativeConfig(k, steps, in_verify, redraft, context)
    for prompt in PROMPTS:
        expected = list(generate(model, prompt, 40, eos_id=None))
        result = speculative_generate(model, [prompt], 40, TINY_MASK_ID, config)
        assert result.tokens == [expected] and decodes_something(expected)
        assert result.verify_forwards == 1 + len(result.accepted)
        assert redraft or result.draft_forwards == steps  # without redrafting only the first round drafts
        written = 1 + sum(a + 1 for a in result.accepted)  # the prefill's token, then a + 1 per verify
        assert written >= 40 > written - result.accepted[-1] - 1  # no round after the 40th token


def test_a_batch_of_different_lengths_decodes_as_each_prompt_alone_and_stops_at_eos(tiny_config):
    model = model_for(tiny_config, True)
    alone = [list(generate(model, p, 30)) for p in PROMPTS]
    eos = alone[1][6]  # a token row 1 writes: rows stop at its first occurrence, as generate does with it as EOS
    expected = [list(generate(model, p, 30, eos_id=eos)) for p in PROMPTS]
    configs = [SpeculativeConfig(4, draft_context="full"), SpeculativeConfig(4), SpeculativeConfig(4, redraft=False)]
    for config in configs:
        result = speculative_generate(model, PROMPTS, 30, TINY_MASK_ID, config, eos)
        assert result.tokens == expected and len(expected[1]) <= 7 and expected[1][-1] == eos
    assert all(decodes_something(row) for row in alone)


def test_drafts_that_are_right_are_accepted_and_counted(tiny_config, monkeypatch):
    """A drafter that drafts the AR continuation itself: every draft kept, k + 1 tokens per verify, and with
    draft_in_verify the masks' drafts are used (the draft forwards are then fewer than the verify rounds)."""
    from model.inference import speculative

    model = model_for(tiny_config, True)
    truth = list(generate(model, PROMPTS[0], 60))

    def oracle(self, n, k, steps, mask_id, full=False):
        done = n - self.prompt_width + 1
        return torch.tensor([truth[done : done + k]])

    monkeypatch.setattr(speculative._Decoder, "draft", oracle)
    result = speculative_generate(model, [PROMPTS[0]], 1 + 5 * 6, TINY_MASK_ID, SpeculativeConfig(5, 1, False))
    assert result.tokens == [truth[:31]] and result.accepted == [5] * 5 and result.draft_forwards == 5
    result = speculative_generate(model, [PROMPTS[0]], 1 + 5 * 6, TINY_MASK_ID, SpeculativeConfig(5, 1, True))
    assert result.tokens == [truth[:31]] and result.accepted[0] == 5  # a round after a full one drafts in verify:
    assert result.draft_forwards < len(result.accepted)  # fewer draft passes than rounds


def test_bad_settings_are_named():
    with pytest.raises(SettingError, match="draft_length"):
        SpeculativeConfig(0).validate()
    with pytest.raises(SettingError, match="draft_steps"):
        SpeculativeConfig(4, 5).validate()
    with pytest.raises(SettingError, match="draft_context"):
        SpeculativeConfig(draft_context="causal").validate()
    with pytest.raises(SettingError, match="draft_in_verify"):
        SpeculativeConfig(draft_in_verify=False, redraft=False).validate()
