"""The flat reference sampler (model/inference/reference_sampler.py) and the fast one (model/inference/sampling.py)
decode the same tokens wherever both apply: every block size, greedy or sampled, low-confidence or random remasking,
with and without guidance and the logit shift, on models whose text varies."""

from dataclasses import replace

import pytest
import torch
from conftest import decodes_something, lively_model

from model.inference.reference_sampler import reference_generate
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.objectives.schedule import NoiseSchedule


@pytest.mark.parametrize("logit_shift", [False, True])
@pytest.mark.parametrize(
    "options",
    [
        {"block_size": None, "steps": 12},
        {"block_size": 4, "steps": 12},
        {"block_size": 4, "steps": 5},  # uneven steps per block, some steps committing two tokens
        {"block_size": 6, "steps": 6, "cfg_scale": 1.5},
        {"block_size": 4, "steps": 12, "temperature": 0.8},
        {"block_size": 3, "steps": 8, "temperature": 1.0, "remasking": "random"},
        {"block_size": 6, "steps": 8, "schedule": NoiseSchedule("cosine")},  # uneven quotas of another schedule
    ],
)
def test_the_fast_sampler_decodes_the_reference_tokens(tiny_config, logit_shift, options):
    torch.manual_seed(0)
    model, mask_id = lively_model(replace(tiny_config, logit_shift=logit_shift)), tiny_config.vocab_size - 1
    prompt = torch.randint(1, mask_id, (3, 5), generator=torch.Generator().manual_seed(1))
    sampler = DiffusionSamplerConfig(gen_length=12, stop_at_eos=False, **options)
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    reference = reference_generate(model, prompt, sampler, mask_id, generator())
    fast = diffusion_generate(model, prompt, sampler, mask_id, generator=generator()).tokens
    assert torch.equal(reference, fast) and decodes_something(reference)
    assert not (reference == mask_id).any()
