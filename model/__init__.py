"""nano-llada's library: the transformer, its config, tokenizer handling and checkpoints."""

from model.checkpoint import load_model, read_checkpoint, save_checkpoint
from model.config import MASK_TOKEN, ModelConfig, preset
from model.errors import NanoLladaError
from model.transformer import KVCache, Transformer

__all__ = [
    "KVCache",
    "MASK_TOKEN",
    "ModelConfig",
    "NanoLladaError",
    "Transformer",
    "load_model",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
]
