"""Every training loss and decoding path runs under bf16 autocast, as on a GPU (here CPU autocast: the same
mixed-dtype meeting points, e.g. fp32 RMSNorm statistics and losses next to bf16 matmuls, CFG logits combined in
fp32, KV caches allocated in the autocast dtype)."""

import pytest
import torch

from model.config import preset
from model.inference.ar import generate, generate_batch
from model.inference.likelihood import conditional_log_likelihood_batch
from model.inference.padding import left_pad
from model.inference.sampling import DiffusionSamplerConfig, diffusion_generate
from model.objectives.ar_loss import next_token_loss
from model.objectives.diffusion_loss import DiffusionObjective, diffusion_loss
from model.objectives.schedule import NoiseSchedule
from model.transformer import Transformer
from scripts.common.data.packing import document_ids

MASK_TOKEN_ID = preset("tiny").vocab_size - 1  # <|mask|> is the last id (model.tokenizer.mask_token_id)

# FlexAttention runs eagerly on the CPU here (on CUDA it is compiled); its warning about that is expected.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def rng():
    return torch.Generator().manual_seed(0)


def rows():
    ids = torch.randint(3, 6000, (2, 32), generator=rng())
    ids[:, 10] = 2  # an EOS: two documents per row
    return ids


SFT_BLOCK_COMPLEMENTARY_CAP = DiffusionObjective(block_size=8, normalization="row", complementary=True, cap_weight=1.0)
LOSSES = {
    "ar": lambda m, x: next_token_loss(m, x),
    "llada": lambda m, x: diffusion_loss(m, x, rng(), MASK_TOKEN_ID, DiffusionObjective(repeat_penalty_weight=0.1)),
    "mdlm_documents": lambda m, x: diffusion_loss(
        m, x, rng(), MASK_TOKEN_ID, DiffusionObjective(NoiseSchedule("cosine")), doc_ids=document_ids(x)
    ),
    "bdlm_documents": lambda m, x: diffusion_loss(
        m, x, rng(), MASK_TOKEN_ID, DiffusionObjective(block_size=8), doc_ids=document_ids(x)
    ),
    "block_sft": lambda m, x: diffusion_loss(
        m, x, rng(), MASK_TOKEN_ID, SFT_BLOCK_COMPLEMENTARY_CAP, maskable=x > 3000
    ),
}


@pytest.mark.parametrize("name", LOSSES)
def test_training_losses_and_backward_under_bf16_autocast(name):
    model = Transformer(preset("tiny"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](model, rows())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


PADDED = left_pad([[1, 5, 6], [1]], pad_id=0)
DECODERS = {
    "ar": lambda m: list(generate(m, [1, 5, 6], 5)),
    "ar_batch_padded": lambda m: generate_batch(m, [[1, 5, 6], [1]], 5),
    "block_causal_cached": lambda m: (
        diffusion_generate(
            m,
            torch.tensor([[1, 5, 6, 7, 8, 9]]),
            DiffusionSamplerConfig(gen_length=8, steps=8, block_size=4, block_causal=True),
            MASK_TOKEN_ID,
        ).tokens
    ),
    "likelihood": lambda m: conditional_log_likelihood_batch(m, [1, 5], [[7, 8], [9]], MASK_TOKEN_ID, 4),
    **{
        f"diffusion_{cache}_cfg{scale}": (
            lambda m, cache=cache, scale=scale: (
                diffusion_generate(
                    m,
                    PADDED[0],
                    DiffusionSamplerConfig(
                        gen_length=8, steps=8, block_size=4, threshold=0.5, cache=cache, cfg_scale=scale
                    ),
                    MASK_TOKEN_ID,
                    prompt_lengths=PADDED[1],
                ).tokens
            )
        )
        for cache in ("none", "prefix", "dual")
        for scale in (0.0, 1.0)
    },
}


@pytest.mark.parametrize("name", DECODERS)
def test_decoding_under_bf16_autocast_with_flex_attention_for_explicit_masks(name):
    model = Transformer(preset("tiny")).eval()
    model.flex_on_cpu = True  # explicit masks take FlexAttention, as on CUDA
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = DECODERS[name](model)
    assert model.flex_attention, "FlexAttention failed and fell back to SDPA"
    if isinstance(out, torch.Tensor):
        assert not (out == MASK_TOKEN_ID).any()
