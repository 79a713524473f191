"""Diffusion sampling: LLaDA low-confidence remasking with semi-autoregressive blocks, unsupervised CFG,
confidence-threshold parallel decoding and prefix/dual K/V caches (Fast-dLLM). AR sampling: model/inference/ar.py.

The canvas is [prompt, <|mask|> x gen_length]. Blocks are decoded left to right; inside a block each step runs the
model on the whole canvas and commits some masked positions of that block. Committed tokens never change
(absorbing), the prompt never changes, and <|mask|> can never be predicted.
With cache="prefix" or "dual" only the first step of a block sees the whole canvas; later steps reuse its
keys/values for the positions outside the block (approximate: those K/V would change as the block fills in).
Rows are independent: a batch decodes together, and a row that has written EOS leaves the batch. Prompts of
different lengths are left-padded (`prompt_lengths`, model/inference/padding.py): padding is never attended to and
positions start at each prompt's first token, so every row decodes as it would alone.

Block-causal mode (`block_causal=True`, for models trained with block diffusion, model/block_attention.py):
blocks of `block_size` start at position 0 of the canvas as in training (the first block may hold the tail of the
prompt, which stays fixed), and a block attends only to itself and earlier blocks. Earlier blocks never change, so
their keys/values are cached exactly: the prompt's whole blocks are prefilled once, each step feeds only the current
block, and a finished block is appended to the cache by one more forward pass (counted in NFE) once all its tokens
are final. Cached and uncached decoding therefore give the same tokens.

A logit-shifted model (ModelConfig.logit_shift, model/logit_shift.py) predicts column j from its output at
column j - 1, computed under the attention column j - 1 has in that path: the window a step feeds starts one column
left of the block (prefix/dual caches keep one column less), and block-causal decoding takes that column's output from
the previous block's pass. Such a model needs a prompt of at least one token; the forward passes are the same.

A prompt-causal model (model/prompt_causal.py) reads its prompt once into an exact cache (prompt_cache.py).
Which mode a checkpoint needs is read from the checkpoint: `sampler_for_checkpoint`. The step: remasking.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from model.block_attention import block_causal_mask
from model.errors import MAX_TEMPERATURE, NanoLladaError, SettingError, check_setting
from model.inference.padding import PaddedLayout
from model.inference.prompt_cache import PromptCache
from model.inference.reference_sampler import REMASKINGS
from model.inference.remasking import DecodingRun, SampleResult, block_quotas, end_rows, pad_finished_rows
from model.logit_shift import is_shifted
from model.objectives.block_curriculum import trained_block_size
from model.objectives.schedule import LINEAR, NoiseSchedule, check_schedule
from model.prompt_causal import is_prompt_causal

DECODINGS = ("auto", "bidirectional", "block-causal")


@dataclass
class DiffusionSamplerConfig:
    gen_length: int
    steps: int  # total forward passes budgeted over all blocks (LLaDA's `steps`)
    block_size: int | None = None  # None: one block covering the whole generation
    temperature: float = 0.0  # Gumbel-max sampling; 0 = greedy
    remasking: str = "low_confidence"  # one of REMASKINGS
    schedule: NoiseSchedule = LINEAR  # how many tokens each step commits (LLaDA: an even split of the block)
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight w
    threshold: float | None = None  # commit every masked position with confidence >= threshold (at least one)
    stop_at_eos: bool = True  # a row that has written EOS stops; the generation stops when every row has
    block_causal: bool = False  # block-diffusion models: block-causal attention, blocks aligned to position 0
    use_kv_cache: bool = True  # block-causal mode: cache the finished blocks (exact); False recomputes the prefix
    cache: str = "none"  # bidirectional models: none | prefix | dual (Fast-dLLM's approximate caches, per block)
    # Bidirectional models: how many blocks past the current one the model sees (None: the whole canvas). Later
    # blocks are all masks, so a window of them tells the model nearly as much for fewer columns per forward pass.
    lookahead_blocks: int | None = None
    # With stop_at_eos and an eos_id: a row is finished inside a block as soon as its first EOS has no mask before
    # it (the rest is EOS padding), instead of committing the padding step by step. The text before EOS is the same.
    finish_at_eos: bool = False
    # Threshold decoding: also commit the n most confident positions while (n + 1)(1 - c_n) < commit_factor.
    commit_factor: float | None = None

    def validate(self, prompt_len: int | None = None) -> None:
        """Refuse impossible settings; with the prompt length, also too few steps for block-causal decoding (whose
        blocks start at the prompt's first token, so their count depends on it)."""
        if self.gen_length <= 0:
            raise SettingError(f"nothing to generate: {{gen_length}} {self.gen_length}")
        check_setting("steps", self.steps, 1)
        check_setting("temperature", self.temperature, 0, high=MAX_TEMPERATURE)
        check_setting("cfg_scale", self.cfg_scale, 0)
        if self.threshold is not None:  # > 1 commits one token per step and <= 0 a block per step: both meaningful
            check_setting("threshold", self.threshold, -math.inf)
        if self.block_causal:
            if not self.block_size or self.block_size <= 0:
                raise SettingError("block-causal decoding needs {block_size}, the block size it was trained with")
            blocks = self.decode_blocks(prompt_len) if prompt_len is not None else 0
        else:
            block = self.block_size or self.gen_length
            if block <= 0 or self.gen_length % block:
                raise SettingError(
                    f"{{block_size}} {block} does not divide the generation length {self.gen_length}; "
                    f"choose a divisor of {self.gen_length} (e.g. {self.gen_length}) or change {{gen_length}}"
                )
            blocks = self.gen_length // block
        if self.threshold is None and self.steps < blocks:
            raise SettingError(
                f"{{steps}} {self.steps} is fewer than the {blocks} blocks to decode; use at least one step per block"
            )
        if self.cache not in ("none", "prefix", "dual"):
            raise SettingError(f"{{cache}} must be none, prefix or dual, got '{self.cache}'")
        if self.cache != "none" and self.block_causal:
            raise SettingError("{cache} prefix/dual is for bidirectional models; block-causal decoding already caches")
        if self.commit_factor is not None:
            check_setting("commit_factor", self.commit_factor, 0, above_low=True)
            if self.threshold is None:
                raise SettingError("{commit_factor} is a rule of threshold decoding: give {threshold} too")
        if self.lookahead_blocks is not None:
            check_setting("lookahead_blocks", self.lookahead_blocks, 0)
        check_schedule(self.schedule)
        if self.schedule != LINEAR and self.threshold is not None:
            raise SettingError("{schedule} fixes each step's commits; {threshold} commits by confidence: give one")
        if self.remasking not in REMASKINGS:
            raise SettingError(f"{{remasking}} must be {' or '.join(REMASKINGS)}, got '{self.remasking}'")

    def check_arguments(self, prompt_len: int | None = None) -> None:
        """A user's settings (the eval flags' and the server requests' one check): validate() and the bounds below."""
        if self.threshold is not None:  # the degenerate thresholds the library runs are never what a user means
            check_setting("threshold", self.threshold, 0, high=1, above_low=True)
        self.validate(prompt_len)  # first: its own messages (steps >= 1) stand for the library's bounds
        check_setting("steps", self.steps, 1, high=self.gen_length)  # a step commits a token: no more steps

    def decode_blocks(self, prompt_len: int) -> int:
        """Block-causal mode: how many blocks hold generated positions (the first may share the prompt's tail)."""
        return -(-(prompt_len + self.gen_length) // self.block_size) - prompt_len // self.block_size


def sampler_for_checkpoint(
    checkpoint, sampler: DiffusionSamplerConfig, decoding: str = "auto", block_size: int | None = None
) -> DiffusionSamplerConfig:
    """The settings `checkpoint` decodes with, given the ones asked for: the one answer to "how does it decode?".

    A checkpoint trained with block diffusion (block SFT, a curriculum's block phase, or a merge of such) decodes
    block-causally with the block size it was trained with: every earlier block is final and its K/V are cached
    exactly, so the approximate Fast-dLLM caches do not apply. Any other decodes as asked. `decoding` forces a
    mode ("bidirectional" or "block-causal"; "auto" reads the checkpoint) and `block_size` replaces the trained
    block size for block-causal decoding (an experiment).
    """
    if decoding not in DECODINGS:
        raise SettingError(f"{{decoding}} must be one of {', '.join(DECODINGS)}, got '{decoding}'")
    trained = trained_block_size(checkpoint.extra)
    if checkpoint.config.prompt_causal and decoding != "block-causal":
        return replace(sampler, cache="none")  # its prompt cache is exact; the approximate ones do not apply
    if decoding == "bidirectional" or (decoding == "auto" and trained is None):
        return sampler
    if not (block_size or trained):
        raise SettingError("block-causal decoding: the model was not trained with block diffusion; give {block_size}")
    return replace(sampler, block_causal=True, block_size=block_size or trained, cache="none")


@torch.no_grad()
def diffusion_generate(
    model,
    prompt: torch.Tensor,
    sampler: DiffusionSamplerConfig,
    mask_id: int,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> SampleResult:
    """Generate sampler.gen_length tokens after `prompt` [B, P].

    `prompt_lengths` [B]: the prompts are left-padded (model.inference.padding.left_pad) and row b's prompt is its last
    prompt_lengths[b] columns; None means every row is a full-width prompt.

    `on_block(k, tokens)` is called after block k is final with that block's generated ids [B, n] (for streaming).
    With eos_id and sampler.stop_at_eos, a row whose finished blocks hold an EOS is done: the rest of it is EOS
    padding and it leaves the batch, so later blocks cost only the rows still writing.
    """
    B, P = prompt.shape
    sampler.validate(P)
    prompt_lengths = None if prompt_lengths is None else prompt_lengths.to(prompt.device)
    padded = prompt_lengths is not None and bool((prompt_lengths != P).any())
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = int(prompt_lengths.max()) if padded else P
    if limit is not None and longest + sampler.gen_length > limit:
        raise NanoLladaError(
            f"a prompt of {longest} tokens plus {sampler.gen_length} new ones exceeds the model's {limit} positions; "
            f"shorten the prompt or generate fewer tokens"
        )
    if is_shifted(model) and (P == 0 or (prompt_lengths is not None and bool((prompt_lengths < 1).any()))):
        raise NanoLladaError(
            "this model is logit-shifted (it predicts each token from the one before it): every prompt needs at "
            "least one token, e.g. BOS"
        )
    if is_prompt_causal(model) and (sampler.block_causal or sampler.cache != "none"):
        raise NanoLladaError(
            "this model reads its prompt causally and decodes over an exact prompt cache: drop --decoding "
            "block-causal and --cache"
        )
    if sampler.block_causal and padded:  # blocks start at each prompt's first token: other lengths, other blocks
        raise NanoLladaError("block-causal decoding batches prompts of equal length only; group the prompts by length")
    canvas = torch.cat([prompt, prompt.new_full((B, sampler.gen_length), mask_id)], dim=1)
    run = DecodingRun(model, sampler, mask_id, generator, prompt)
    run.finish_id = eos_id if sampler.finish_at_eos and sampler.stop_at_eos else None
    if sampler.block_causal:
        _block_causal_decode(run, canvas, eos_id, on_block)
    else:
        layout = PaddedLayout.build(prompt_lengths, P, canvas.shape[1]) if padded else None
        _bidirectional_decode(run, canvas, eos_id, on_block, layout)
    run.result.tokens = canvas[:, P:]
    return run.result


def _bidirectional_decode(
    run: DecodingRun, canvas: torch.Tensor, eos_id, on_block, layout: PaddedLayout | None
) -> None:
    """Semi-autoregressive blocks over the whole canvas (or its first `lookahead_blocks` blocks past the current one);
    the rows that have ended leave the batch."""
    sampler, P = run.sampler, run.prompt_width
    block_size = sampler.block_size or sampler.gen_length
    num_blocks = sampler.gen_length // block_size
    prompt = PromptCache(run, canvas, layout) if is_prompt_causal(run.model) else None
    for k in range(num_blocks):
        lo, hi = P + k * block_size, P + (k + 1) * block_size
        end = canvas.shape[1] if sampler.lookahead_blocks is None else hi + sampler.lookahead_blocks * block_size
        block_steps = sampler.steps // num_blocks + (k < sampler.steps % num_blocks)
        writing = (canvas[:, lo:hi] == run.mask_id).any(1)  # rows that have not ended
        if writing.all():  # a column slice is a view: the block's commits land in the canvas
            _decode_block(run, canvas[:, :end], lo, hi, block_steps, None, layout, prompt)
        elif writing.any():
            rows = writing.nonzero().squeeze(1)
            view = canvas[rows, :end]
            _decode_block(run, view, lo, hi, block_steps, rows, layout.select(rows) if layout else None, prompt)
            canvas[rows, :end] = view
        if on_block is not None:
            on_block(k, canvas[:, lo:hi])
        if sampler.stop_at_eos and eos_id is not None and end_rows(canvas, P, hi, eos_id).all():
            return


def _decode_block(run: DecodingRun, canvas, lo: int, hi: int, steps: int, rows, layout, prompt=None) -> None:
    """Unmask canvas[:, lo:hi] in place, by step quotas or by threshold, with or without an approximate cache.

    cache="none": every step is one forward over the whole canvas.
    cache="prefix"/"dual" (Fast-dLLM, section 3.5; approximate for a bidirectional model): the block's first step is a
    full forward whose keys/values are kept; later steps feed only block + suffix (prefix) or only the block (dual),
    for a shifted model with the column before the block in front, and attend to the kept K/V, which go stale as the
    block fills in and are refreshed at the next block.
    `rows` are the indices of these rows in the full batch (None: all rows), for the per-step commit counts;
    `layout` says where the real tokens of left-padded rows are (None: no padding). `prompt`: a prompt-causal model's
    exact prompt cache (model/inference/prompt_cache.py), which every step of the block reads.
    """
    if prompt is not None:
        prompt.keep(rows)
        for quota in block_quotas(canvas, lo, hi, run.mask_id, steps, run.sampler):
            logits = run.predictions(prompt.step(run, canvas), run.prompt_width, lo, hi, prompt.before)
            run.commit(logits, canvas, lo, hi, quota, rows)
            if run.finish_id is not None:
                pad_finished_rows(canvas[:, run.prompt_width : hi], run.finish_id, run.mask_id)
        return
    B, total, cache = canvas.shape[0], canvas.shape[1], run.sampler.cache
    layout = layout.repeat(2 if run.guided else 1) if layout is not None else None
    every_column = torch.arange(total, device=canvas.device)

    def forward(columns: torch.Tensor, keys: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Logits for the canvas columns `columns` (at their true positions), which see the keys at columns `keys`."""
        ids = run.inputs(canvas, 0)[:, columns]  # CFG hides prompt columns wherever `columns` puts them
        if layout is not None:
            positions = layout.positions[:, columns]
            return run.forward(ids, attention=layout.key_mask(keys), kv_cache=kv_cache, positions=positions)
        if kv_cache is None:
            return run.forward(ids, attention="bidirectional")
        if cache == "prefix":  # natural column order: positions follow from the cache length
            return run.forward(ids, attention="bidirectional", kv_cache=kv_cache)
        return run.forward(ids, attention="bidirectional", kv_cache=kv_cache, positions=columns)

    # A shifted model reads column lo's prediction at column lo - 1, so the window a step feeds starts at
    # `start` = lo - 1 (still final: the prompt's last token or the previous block's) and its output is fresh.
    # Dual cache: the refresh forward runs on the canvas reordered to [before start, after block, start..block] with
    # each token at its true position, so the cache ends up holding [prefix, suffix] K/V and the window's K/V,
    # appended last, can be cropped off after every step. Bidirectional attention does not care about key order.
    # (Key order: the cache holds canvas columns in `order`; the prefix cache keeps the natural order.)
    start = max(lo - 1, 0) if run.shifted else lo  # at lo = 0 nothing is to its left
    order = every_column
    if cache == "dual":
        order = torch.cat([every_column[:start], every_column[hi:], every_column[start:hi]])
    keep = {"prefix": start, "dual": total - (hi - start)}.get(cache)
    kv_cache = None
    for quota in block_quotas(canvas, lo, hi, run.mask_id, steps, run.sampler):
        first = start  # the canvas column the first of `logits` belongs to
        if cache == "none":
            logits, first = forward(every_column, every_column), 0
        elif kv_cache is None:  # refresh: one exact full forward, whose logits serve this step
            kv_cache = run.model.new_kv_cache(B * (2 if run.guided else 1), total)
            logits = forward(order, order, kv_cache)
            logits, first = (logits, 0) if cache == "prefix" else (logits[:, keep:], start)
        elif cache == "prefix":  # window + suffix at positions start..total, over the cached prefix
            logits = forward(every_column[start:], every_column, kv_cache)
        else:  # only the window, at its true positions, over the cached prefix and suffix
            logits = forward(every_column[start:hi], order, kv_cache)
        if kv_cache is not None:
            kv_cache.crop(keep)
        run.commit(run.predictions(logits, first, lo, hi), canvas, lo, hi, quota, rows)
        if run.finish_id is not None:
            pad_finished_rows(canvas[:, run.prompt_width : hi], run.finish_id, run.mask_id)


def _block_causal_decode(run: DecodingRun, canvas: torch.Tensor, eos_id, on_block) -> None:
    """Block-by-block decoding under the block-causal mask (see the module docstring). Rows that have ended leave
    the batch, and their rows of the K/V cache with them.

    A shifted model predicts a block's first column from the previous block's last, whose output sees only blocks up
    to its own: with the cache, that is the last output of the pass that put the previous block into the cache
    (`before`, carried from block to block); without it, the full block-causal forward computes it each step."""
    sampler, P, block_size = run.sampler, run.prompt_width, run.sampler.block_size
    total = canvas.shape[1]
    first_block = P // block_size  # blocks [first_block, num_blocks) hold generated positions
    num_blocks = -(-total // block_size)
    decode_blocks = sampler.decode_blocks(P)
    block_of = torch.arange(total, device=canvas.device) // block_size
    copies = 2 if run.guided else 1  # CFG stacks [conditional; unconditional] rows, in the cache too
    cache = run.model.new_kv_cache(run.batch * copies, total) if sampler.use_kv_cache else None
    before = None  # a shifted model's output at the column left of the block (None: nothing is, or unshifted)
    if cache is not None and first_block > 0:  # the prompt's whole blocks, once
        lo = first_block * block_size
        ids = run.inputs(canvas[:, :lo], 0)
        before = run.last_output(run.forward(ids, attention=block_causal_mask(block_of[:lo]), kv_cache=cache))
    rows = None  # the rows still decoding (None: all of them)
    for k in range(first_block, num_blocks):
        lo, hi = k * block_size, min((k + 1) * block_size, total)
        block_steps = sampler.steps // decode_blocks + (k - first_block < sampler.steps % decode_blocks)
        view = canvas if rows is None else canvas[rows]
        for quota in block_quotas(view, lo, hi, run.mask_id, block_steps, sampler):
            if cache is None:  # reference path: the whole prefix under the block-causal mask
                ids = run.inputs(view[:, :hi], 0)
                logits = run.forward(ids, attention=block_causal_mask(block_of[:hi]))
                logits = run.predictions(logits, 0, lo, hi)
            else:  # the block sees every cached (earlier) position and itself; its K/V are dropped again
                logits = run.forward(run.inputs(view[:, lo:hi], lo), attention="bidirectional", kv_cache=cache)
                logits = run.predictions(logits, lo, lo, hi, before)
                cache.crop(lo)
            run.commit(logits, view, lo, hi, quota, rows)
        if rows is not None:
            canvas[rows] = view
        if on_block is not None:
            on_block(k - first_block, canvas[:, max(lo, P) : hi])
        if sampler.stop_at_eos and eos_id is not None:
            ended = end_rows(canvas, P, hi, eos_id)
            if ended.all():
                return
            going = ended.logical_not() if rows is None else ended[rows].logical_not()
            if not going.all():  # rows that ended leave the batch
                if cache is not None:
                    cache.keep_rows(going.repeat(copies))
                    before = before[going.repeat(copies)] if before is not None else None
                rows = going.nonzero().squeeze(1) if rows is None else rows[going]
                view = canvas[rows]
        if cache is not None and hi < total:  # the block is final: now its K/V may join the cache
            ids = run.inputs(view[:, lo:hi], lo)
            before = run.last_output(run.forward(ids, attention="bidirectional", kv_cache=cache))


def strip_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS: LLaDA pads the canvas with EOS."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
