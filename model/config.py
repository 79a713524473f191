"""ModelConfig: every shape and positional-encoding setting of the transformer, stored in each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from model.errors import NanoLladaError

# MiniMind2's tokenizer (and the repo's) has 6400 tokens; `<|mask|>` is appended after them, so the default
# vocabulary is 6401. Its id is the tokenizer's to say: model.tokenizer.mask_token_id.
BASE_VOCAB_SIZE = 6400
MASK_TOKEN = "<|mask|>"


@dataclass
class ModelConfig:
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    vocab_size: int = BASE_VOCAB_SIZE + 1  # 6400 tokens + <|mask|>
    # Embedding and head rows are padded to a multiple of this for faster matmuls (6401 -> 6464). Padding ids
    # are never inputs, and the model returns logits for the real vocabulary only, so they can never be
    # sampled or trained.
    pad_vocab_multiple: int = 64
    intermediate_size: int | None = None  # None -> 64 * ceil(int(8h/3) / 64), as MiniMind2
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    # YaRN (MiniMind2's numbers). Part of the config, so every stage (and every load) uses the same positions
    # instead of each script choosing its own.
    inference_rope_scaling: bool = False
    rope_scaling_factor: float = 16.0
    rope_original_max_positions: int = 2048
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    # Diffusion models converted from an AR model may keep its next-token head: the prediction for position i is
    # read at position i - 1 (Dream, Fast-dLLM v2). A checkpoint without the field was written before it existed
    # and is unshifted. model/logit_shift.py applies it.
    logit_shift: bool = False
    # Diffusion SFT may read the prompt causally (each prompt token sees only the tokens before it) while the answer
    # sees the prompt and itself; the sampler and the likelihoods then do the same. False (and a checkpoint without
    # the field): every token sees the whole row. model/prompt_causal.py applies it.
    prompt_causal: bool = False

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(int(self.hidden_size * 8 / 3) / 64)
        self.validate()

    def validate(self) -> None:
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
            "pad_vocab_multiple",
        ):
            if getattr(self, name) <= 0:
                raise NanoLladaError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise NanoLladaError(
                f"model config: hidden size {self.hidden_size} is not divisible by "
                f"{self.num_attention_heads} attention heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise NanoLladaError(
                f"model config: {self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise NanoLladaError(f"model config: head dim {self.head_dim} must be even for RoPE")

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise NanoLladaError(
                f"model config has unknown fields {sorted(unknown)}; was it written by a newer nano-llada?"
            )
        # Checkpoints written before vocabulary padding existed store unpadded tensors.
        return cls(**{"pad_vocab_multiple": 1, **data})

    def num_parameters(self) -> int:
        h, i, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.padded_vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return V * h * (1 if self.tie_word_embeddings else 2) + L * per_layer + h


PRESETS = {
    "minimind2_small": dict(hidden_size=512, num_hidden_layers=8),  # 26M, the default
    "minimind2": dict(hidden_size=768, num_hidden_layers=16),  # 104M
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048
    ),
    "small": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096
    ),
}


# The fields that make two models the same architecture (the logit shift, positions and dropout may differ).
ARCHITECTURE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def shape_difference(a, b) -> list[str]:
    """The architecture fields in which two ModelConfigs differ, as 'field a vs b'."""
    return [
        f"{name} {getattr(a, name)} vs {getattr(b, name)}"
        for name in ARCHITECTURE_FIELDS
        if getattr(a, name) != getattr(b, name)
    ]


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise NanoLladaError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
