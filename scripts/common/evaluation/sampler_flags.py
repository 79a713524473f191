"""The diffusion decoding flags of the eval entry points, written once, and how their values become the settings
a checkpoint decodes with (model.inference.sampling.sampler_for_checkpoint decides the mode from the checkpoint)."""

from __future__ import annotations

import argparse
import contextlib

from model.errors import NanoLladaError, SettingError
from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint

# The command-line name of each sampler parameter, for the library's messages (model.errors.SettingError): the
# diffusion sampler's and the AR sampler's (model.inference.ar.ARSamplerConfig).
SAMPLER_FLAGS = {
    "gen_length": "--max-new-tokens",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "cfg_scale": "--gen-cfg-scale",
    "steps": "--gen-steps",
    "block_size": "--block-length",
    "remasking": "--remasking",
    "cache": "--cache",
    "threshold": "--threshold",
    "decoding": "--decoding",
}


def add_sampler_flags(p: argparse.ArgumentParser, block_default: str) -> None:
    """The sampler flags of eval_diffusion and eval_sft_one_prompt (`block_default`: what no --block-length means)."""
    p.add_argument("--gen-steps", type=int, default=None, help="diffusion forward passes (default: one per token)")
    p.add_argument(
        "--block-length",
        dest="block_size",
        type=int,
        default=None,
        help=f"semi-autoregressive block size (default: {block_default})",
    )
    p.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    p.add_argument("--temperature", type=float, default=0.0, help="diffusion Gumbel-max temperature; 0 = greedy")
    p.add_argument(
        "--gen-cfg-scale", type=float, default=0.0, help="unsupervised classifier-free guidance weight (0 = off)"
    )
    p.add_argument(
        "--cache",
        choices=["none", "prefix", "dual"],
        default="none",
        help="Fast-dLLM approximate K/V cache for bidirectional models, refreshed once per block",
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="parallel decoding: commit every token with confidence >= this"
    )


def check_sample_length(max_new_tokens: int, estimating: bool, estimate_flags: str) -> None:
    """--max-new-tokens 0 means no sample, only the estimates that `estimate_flags` ask for: refuse it when none is
    asked for (nothing would be done), and refuse negative lengths."""
    if max_new_tokens < 0 or (max_new_tokens == 0 and not estimating):
        raise NanoLladaError(
            f"--max-new-tokens must be >= 1, got {max_new_tokens} (0 skips the sample when {estimate_flags} is given)"
        )


def generation_length(prompt_len: int, seq_len: int, max_new_tokens: int) -> int:
    """--max-new-tokens, lowered where needed so that prompt + generation fit --seq-len (the canvas limit)."""
    room = seq_len - prompt_len
    if room <= 0:
        raise NanoLladaError(
            f"the prompt is {prompt_len} tokens, which leaves no room in --seq-len {seq_len}; "
            "shorten it or raise --seq-len"
        )
    return min(max_new_tokens, room)


def sampler_from_args(
    args,
    checkpoint,
    gen_length: int,
    block_size: int | None,
    decoding: str = "auto",
    trained_block_override: int | None = None,
    prompt_len: int | None = None,
    **options,
) -> DiffusionSamplerConfig:
    """The settings `checkpoint` decodes with under the sampler flags, checked as a user's arguments (the server
    checks its requests the same way), for a prompt of `prompt_len` tokens when given; `options` are more sampler
    fields. `decoding` and `trained_block_override` replace the
    checkpoint's own mode and block size (eval_diffusion's --decoding and --block-length)."""
    asked = DiffusionSamplerConfig(
        gen_length=gen_length,
        steps=gen_length if args.gen_steps is None else args.gen_steps,  # 0 is refused, not the default
        block_size=block_size,
        temperature=args.temperature,
        remasking=args.remasking,
        cfg_scale=args.gen_cfg_scale,
        threshold=args.threshold,
        cache=args.cache,
        **options,
    )
    with flag_names():
        sampler = sampler_for_checkpoint(checkpoint, asked, decoding, trained_block_override)
        sampler.check_arguments(prompt_len)
    return sampler


@contextlib.contextmanager
def flag_names(renamed: dict[str, str] | None = None):
    """Reword the sampler's complaints about its parameters as complaints about the command-line flags (`renamed`:
    an entry point's own names for some of them)."""
    try:
        yield
    except SettingError as err:
        raise NanoLladaError(err.worded({**SAMPLER_FLAGS, **(renamed or {})})) from None
