"""Batched generation of prompts with different lengths: left padding is invisible to every row."""

from dataclasses import replace

import pytest
import torch
from conftest import lively_model

from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig, generate, generate_batch
from model.inference.padding import left_pad
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.transformer import Transformer

PROMPTS = [[1, 5, 9, 33], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 99], [44]]


def test_left_pad_right_aligns_and_rejects_empty_prompts():
    ids, lengths = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and lengths.tolist() == [2, 1]
    with pytest.raises(NanoLladaError, match="empty prompt"):
        left_pad([[5], []], pad_id=0)


def test_ar_batch_equals_each_prompt_alone_with_eos_and_banned_ids(tiny_config):
    model = lively_model(tiny_config)
    eos = list(generate(model, PROMPTS[1], 12))[3]  # a token row 1 writes: that row stops early
    sampler = ARSamplerConfig(banned_ids=(100,))
    alone = [list(generate(model, p, 12, sampler, eos_id=eos)) for p in PROMPTS]
    batched = generate_batch(model, PROMPTS, 12, sampler, eos_id=eos)
    assert batched == alone
    assert len(set(map(len, alone))) > 1 and len(set(tuple(a) for a in alone)) == len(alone)  # the case is not trivial
    assert all(100 not in row for row in batched)


def test_ar_batch_respects_each_rows_position_limit(tiny_config):
    tiny_config.max_position_embeddings = 12
    model = lively_model(tiny_config)
    batched = generate_batch(model, PROMPTS, 20)
    assert [len(row) for row in batched] == [12 - len(p) for p in PROMPTS]
    assert batched == [list(generate(model, p, 20)) for p in PROMPTS]


def test_ar_padding_token_is_never_seen(tiny_config):
    model = lively_model(tiny_config)
    assert generate_batch(model, PROMPTS, 8, pad_id=0) == generate_batch(model, PROMPTS, 8, pad_id=57)


MODES = [
    {},
    {"threshold": 0.3},
    {"threshold": 0.3, "cache": "prefix"},
    {"threshold": 0.3, "cache": "dual"},
    {"cfg_scale": 1.0},
    {"cfg_scale": 1.0, "threshold": 0.5, "cache": "dual"},
]


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("logit_shift", [False, True])
def test_diffusion_batch_of_padded_prompts_equals_each_prompt_alone(tiny_config, options, logit_shift):
    tiny_config.logit_shift = logit_shift
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, stop_at_eos=False, **options)
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    batched = diffusion_generate(model, ids, sampler, mask_id, prompt_lengths=lengths)
    alone = [diffusion_generate(model, torch.tensor([p]), sampler, mask_id) for p in PROMPTS]
    assert torch.equal(batched.tokens, torch.cat([a.tokens for a in alone]))
    # the padding is masked out, not merely unlikely to matter: another pad id changes nothing
    repadded = diffusion_generate(model, ids.masked_fill(ids == 0, 57), sampler, mask_id, prompt_lengths=lengths)
    assert torch.equal(repadded.tokens, batched.tokens)


@pytest.mark.parametrize("logit_shift", [False, True])
def test_diffusion_padded_rows_that_write_eos_leave_the_batch(tiny_config, logit_shift):
    tiny_config.logit_shift = logit_shift
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4)
    first = diffusion_generate(model, torch.tensor([PROMPTS[2]]), sampler, mask_id).tokens[0]
    eos = int(first[1])  # row 2 writes this in its first block: it ends there and the others go on
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    batched = diffusion_generate(model, ids, sampler, mask_id, eos_id=eos, prompt_lengths=lengths)
    alone = torch.cat(
        [diffusion_generate(model, torch.tensor([p]), sampler, mask_id, eos_id=eos).tokens for p in PROMPTS]
    )
    assert torch.equal(batched.tokens, alone)
    assert (
        (batched.tokens[2, 4:] == eos).all()
        and len(batched.commits) > 4
        and torch.stack(batched.commits)[4:, 2].sum() == 0
    )


class RowCounting(torch.nn.Module):
    """Records how many rows each forward pass feeds."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.rows = inner, inner.config, []

    def forward(self, ids, **kwargs):
        self.rows.append(ids.shape[0])
        return self.inner(ids, **kwargs)

    def new_kv_cache(self, batch_size, max_length):
        return self.inner.new_kv_cache(batch_size, max_length)


@pytest.mark.parametrize("options", [{}, {"use_kv_cache": False}, {"cfg_scale": 1.0}, {"threshold": 0.3}])
@pytest.mark.parametrize("logit_shift", [False, True])
def test_block_causal_rows_that_write_eos_leave_the_batch(tiny_config, options, logit_shift):
    tiny_config.logit_shift = logit_shift
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=12, steps=12, block_size=4, block_causal=True, **options)
    prompts = torch.tensor([[1, 5, 9, 33, 8, 2], [1, 7, 3, 3, 40, 41], [1, 2, 3, 4, 5, 99]])
    first = diffusion_generate(model, prompts[2:], sampler, mask_id).tokens[0]
    eos = int(first[0])  # row 2 writes this in its first block (the prompt's tail + 2 new): it ends there
    counting = RowCounting(model)
    batched = diffusion_generate(counting, prompts, sampler, mask_id, eos_id=eos)
    alone = [diffusion_generate(model, prompts[b : b + 1], sampler, mask_id, eos_id=eos) for b in range(3)]
    assert torch.equal(batched.tokens, torch.cat([a.tokens for a in alone]))
    assert (batched.tokens[2, 2:] == eos).all() and not (batched.tokens[:2, 2:] == eos).all(1).any()
    copies = 2 if "cfg_scale" in options else 1
    assert counting.rows[0] == 3 * copies and counting.rows[-1] < 3 * copies  # row 2 left after its first block
    assert torch.stack(batched.commits)[len(alone[2].commits) :, 2].sum() == 0
    kept = diffusion_generate(RowCounting(model), prompts, replace(sampler, stop_at_eos=False), mask_id, eos_id=eos)
    assert batched.nfe <= kept.nfe and sum(counting.rows) < 3 * copies * kept.nfe


def test_block_causal_decoding_of_unequal_prompts_is_refused_with_the_fix(tiny_config):
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    sampler = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, block_causal=True)
    ids, lengths = left_pad(PROMPTS, pad_id=0)
    with pytest.raises(NanoLladaError, match="group the prompts by length"):
        diffusion_generate(model, ids, sampler, mask_id, prompt_lengths=lengths)
    same = torch.tensor([PROMPTS[0], PROMPTS[0]])
    out = diffusion_generate(model, same, sampler, mask_id, prompt_lengths=torch.tensor([4, 4]))
    assert torch.equal(out.tokens, diffusion_generate(model, same, sampler, mask_id).tokens)


@pytest.mark.parametrize("block_causal", [False, True])
def test_batched_answers_come_back_in_prompt_order_and_equal_one_at_a_time(block_causal):
    """diffusion_answers batches left-padded prompts; for a block-trained model it groups them by length
    (blocks start at each prompt's first token) and still returns the answers in the prompts' order."""
    from model.config import preset
    from model.tokenizer import load_tokenizer
    from scripts.common.evaluation.generation import ar_answers, diffusion_answers

    tokenizer, model = load_tokenizer("."), lively_model(preset("tiny"))
    prompts = [[1, 300, 301], [1, 400], [1, 500, 501, 502, 503], [1, 600], [1, 700, 701]]
    sampler = DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, block_causal=block_causal, stop_at_eos=False)
    device = torch.device("cpu")
    alone = diffusion_answers(model, tokenizer, prompts, sampler, device, dtype="float32", batch_size=1)
    batched = diffusion_answers(model, tokenizer, prompts, sampler, device, dtype="float32", batch_size=4)
    assert [a.ids for a in batched] == [a.ids for a in alone] and len({tuple(a.ids) for a in alone}) > 1
    assert [a.batch for a in batched] == ([2, 2, 1, 2, 2] if block_causal else [4, 4, 4, 4, 1])
    ar_alone = ar_answers(model, tokenizer, prompts, 6, device, dtype="float32", batch_size=1)
    assert [a.ids for a in ar_answers(model, tokenizer, prompts, 6, device, dtype="float32", batch_size=3)] == [
        a.ids for a in ar_alone
    ]


def test_prompts_too_long_for_the_positions_are_refused_with_the_fix(tiny_config):
    tiny_config.max_position_embeddings = 10
    model, mask_id = lively_model(tiny_config), tiny_config.vocab_size - 1
    with pytest.raises(NanoLladaError, match="no room"):
        generate_batch(model, [[1] * 10, [1, 2]], 4)
    ids, lengths = left_pad([[1] * 8, [1, 2]], pad_id=0)
    with pytest.raises(NanoLladaError, match="exceeds the model's 10 positions"):
        diffusion_generate(model, ids, DiffusionSamplerConfig(gen_length=4, steps=4), mask_id, prompt_lengths=lengths)
    assert diffusion_generate(
        model, ids[1:, 6:], DiffusionSamplerConfig(gen_length=4, steps=4), mask_id
    ).tokens.shape == (1, 4)


class _Job:
    """What BatchWorker.decode needs of a queued request."""

    def __init__(self, request):
        self.request, self.tokens, self.error = request, [], None

    def wanted(self):
        return True

    def push(self, tokens):
        self.tokens += tokens

    def end(self, error=None):
        self.error = error or self.error


def test_the_server_decodes_under_the_devices_bf16_autocast(tiny_config, monkeypatch):
    # On CUDA autocast(device, "bfloat16") is bf16 (SDPA's fused kernels instead of fp32 math); on the CPU it is a
    # no-op, so the test swaps in CPU autocast and checks every forward of a decode runs inside it.
    from types import SimpleNamespace

    from scripts.common.serving import batching

    asked, inside = [], []

    def cpu_autocast(device, dtype):
        asked.append((device.type, dtype))
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(batching, "autocast", cpu_autocast)
    torch.manual_seed(0)
    model = Transformer(tiny_config).eval()
    model.register_forward_pre_hook(lambda module, args: inside.append(torch.is_autocast_enabled("cpu")))
    request = SimpleNamespace(prompt_ids=[1, 5, 7], sampler=None, max_tokens=4, temperature=0.0, top_k=0, top_p=1.0)
    job = _Job(SimpleNamespace(**vars(request), seed=None))
    batching.BatchWorker(model, mask_id=tiny_config.vocab_size - 1).decode([job])
    assert job.error is None and len(job.tokens) == 4
    assert asked == [("cpu", "bfloat16")] and inside and all(inside)
