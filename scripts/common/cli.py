"""CLI plumbing shared by the entry points: clean one-line errors, model flags, device choice."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from model.config import ModelConfig
from model.errors import NanoLladaError


def run_main(main_fn) -> None:
    """Run an entry point; a NanoLladaError becomes one line on stderr and exit status 2 (no traceback).
    Under torchrun only rank 0 prints: the other ranks' stdout is discarded (their errors still reach stderr)."""
    try:
        with contextlib.ExitStack() as stack:
            if int(os.environ.get("RANK", "0")) > 0:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            main_fn()
    except NanoLladaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)


# ModelConfig fields with a flag of the same name (the seed commands' shape flags); defaults are ModelConfig's.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "dropout",
)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Shape flags of the seed commands (defaults = MiniMind2-Small). A checkpoint's stored config wins over them."""
    group = parser.add_argument_group("model shape (ignored when a checkpoint supplies the config)")
    for name in SHAPE_FIELDS:
        default = ModelConfig.__dataclass_fields__[name].default
        group.add_argument(
            f"--{name.replace('_', '-')}", type=int if default is None else type(default), default=default
        )
    group.add_argument(
        "--untie-word-embeddings",
        action="store_true",
        help="separate output head (default: tied to the embedding, as MiniMind2)",
    )
    group.add_argument(
        "--inference-rope-scaling",
        action="store_true",
        help="YaRN RoPE scaling (factor 16 over 2048 positions), stored in the checkpoint",
    )


def model_config_from_args(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        **{name: getattr(args, name) for name in SHAPE_FIELDS},
        vocab_size=vocab_size,
        tie_word_embeddings=not args.untie_word_embeddings,
        inference_rope_scaling=args.inference_rope_scaling,
    )


def pick_device(name: str | None = None) -> torch.device:
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise NanoLladaError(f"--device {name} requested but CUDA is not available; use --device cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def positive(name: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise NanoLladaError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
