"""The flags of the eval entry points, written once: the prompt and held-out rows of eval_minimind and eval_diffusion,
the diffusion decoding flags, and how their values become the settings a checkpoint decodes with
(model.inference.sampling.sampler_for_checkpoint decides the mode from the checkpoint)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from model.errors import NanoLladaError
from model.inference.sampling import REMASKINGS, DiffusionSamplerConfig, sampler_for_checkpoint
from model.objectives.schedule import SCHEDULES, NoiseSchedule
from scripts.common.cli import flag_names
from scripts.common.evaluation.loading import Device, HeldOutRows
from scripts.common.settings import flag


@dataclass
class PromptAndHeldOut(HeldOutRows, Device):
    """The flags eval_minimind and eval_diffusion share: a prompt to continue, held-out rows to score."""

    prompt: str = flag("请介绍你自己。", "the text to continue")
    chat: bool = flag(False, "wrap the prompt in the tokenizer's chat template (for SFT models)")
    max_new_tokens: int = flag(128, "0: no sample, only the estimates asked for (--eval-data, ...)")
    show_special: bool = flag(False, "print the raw output, special tokens (and diffusion's EOS padding) included")
    eval_data: str | None = flag(None, "held-out jsonl/txt: AR loss and perplexity, diffusion NELBO (an upper bound)")
    seq_len: int = flag(256, "row length for --eval-data; diffusion: prompt + generation", "--max-seq-len", low=2)
    eval_max_batches: int = flag(10, "held-out rows scored = batch size x this (fewer if the file is short)", low=1)
    seed: int = flag(2026, "seeds the sampling and the mask draws")


@dataclass
class SamplerFlags:
    """The diffusion decoding flags of the eval entry points: DiffusionSamplerConfig's fields of the same names (the
    seed commands' spellings kept as aliases); the generation length comes from --max-new-tokens and the prompt."""

    steps: int | None = flag(None, "diffusion forward passes (default: one per token)", "--gen-steps", kind=int)
    block_size: int | None = flag(
        None,
        "semi-autoregressive block size (default: a block-diffusion checkpoint's own; otherwise eval_diffusion decodes "
        "one block, eval_sft_one_prompt blocks of 32 where they divide the length)",
        "--block-length",
        kind=int,
    )
    remasking: str = flag("low_confidence", "which masked positions a step commits", choices=REMASKINGS)
    schedule: str = flag("linear", "how many a step commits: linear (LLaDA's even split) or cosine", choices=SCHEDULES)
    temperature: float = flag(0.0, "diffusion Gumbel-max temperature; 0 = greedy")
    cfg_scale: float = flag(0.0, "unsupervised classifier-free guidance weight (0 = off)", "--gen-cfg-scale")
    cache: str = flag(
        "none",
        "Fast-dLLM approximate K/V cache for bidirectional models, refreshed once per block",
        choices=["none", "prefix", "dual"],
    )
    threshold: float | None = flag(None, "parallel decoding: commit every token with confidence >= this", kind=float)

    def asked(self, gen_length: int, **options) -> DiffusionSamplerConfig:
        """The settings these flags ask for, for `gen_length` tokens; `options`: more sampler fields."""
        steps = gen_length if self.steps is None else self.steps  # 0 is refused, not the default
        fields = {**asdict(self), "steps": steps, "schedule": NoiseSchedule(self.schedule), **options}
        return DiffusionSamplerConfig(gen_length=gen_length, **fields)


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


def checked_sampler(
    asked: DiffusionSamplerConfig,
    checkpoint,
    decoding: str = "auto",
    trained_block_override: int | None = None,
    prompt_len: int | None = None,
) -> DiffusionSamplerConfig:
    """The settings `checkpoint` decodes with when `asked` is what the flags ask for, checked as a user's arguments
    (the server checks its requests the same way), for a prompt of `prompt_len` tokens when given. `decoding` and
    `trained_block_override` replace the checkpoint's own mode and block size (eval_diffusion's --decoding and
    --block-length)."""
    with flag_names():
        sampler = sampler_for_checkpoint(checkpoint, asked, decoding, trained_block_override)
        sampler.check_arguments(prompt_len)
    return sampler
