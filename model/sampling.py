"""Diffusion sampling: LLaDA low-confidence remasking with semi-autoregressive blocks, unsupervised CFG,
confidence-threshold parallel decoding and prefix/dual K/V caches (Fast-dLLM). AR sampling lives in model/ar.py.

The canvas is [prompt, <|mask|> x gen_length]. Blocks are decoded left to right; inside a block each
step runs the model on the whole canvas and commits some masked positions of that block. Committed
tokens never change (absorbing), the prompt never changes, and <|mask|> can never be predicted.
With cache="prefix" or "dual" only the first step of a block sees the whole canvas; later steps reuse its
keys/values for the positions outside the block (approximate: those K/V would change as the block fills in).
Rows are independent: a batch decodes together, and a row that has written EOS leaves the batch. Prompts of
different lengths are left-padded (`prompt_lengths`, model/padding.py): padding is never attended to and
positions start at each prompt's first token, so every row decodes as it would alone.

Block-causal mode (`block_causal=True`, for models trained with block diffusion, model/block_diffusion.py):
blocks of `block_length` start at position 0 of the canvas as in training (the first block may hold the tail
of the prompt, which stays fixed), and a block attends only to itself and earlier blocks. Earlier blocks
never change, so their keys/values are cached exactly: the prompt's whole blocks are prefilled once, each
step feeds only the current block, and a finished block is appended to the cache by one more forward pass
(counted in NFE) once all its tokens are final (invariant F6: cached and uncached decoding agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.block_diffusion import block_causal_mask
from model.errors import NanoLladaError
from model.padding import PaddedLayout


@dataclass
class DiffusionSamplerConfig:
    gen_length: int
    steps: int  # total forward passes budgeted over all blocks (LLaDA's `steps`)
    block_length: int | None = None  # None: one block covering the whole generation
    temperature: float = 0.0  # Gumbel-max sampling; 0 = greedy
    remasking: str = "low_confidence"  # low_confidence | random
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight w
    threshold: float | None = None  # commit every masked position with confidence >= threshold (at least one)
    stop_at_eos: bool = True  # stop after the block in which every row has produced EOS
    block_causal: bool = False  # block-diffusion models: block-causal attention, blocks aligned to position 0
    use_kv_cache: bool = True  # block-causal mode: cache the finished blocks (exact); False recomputes the prefix
    cache: str = (
        "none"  # bidirectional models: none | prefix | dual, Fast-dLLM's approximate K/V caches refreshed per block
    )

    def validate(self, prompt_len: int | None = None) -> None:
        """Refuse impossible settings; with the prompt length, also too few steps for block-causal decoding (whose
        blocks start at the prompt's first token, so their count depends on it)."""
        block = self.block_length or self.gen_length
        if self.gen_length <= 0:
            raise NanoLladaError(f"nothing to generate: generation length {self.gen_length}")
        if self.block_causal:
            if not self.block_length or self.block_length <= 0:
                raise NanoLladaError(
                    "block-causal decoding needs --block-length (the block size the model was trained with)"
                )
            blocks = self.decode_blocks(prompt_len) if prompt_len is not None else 0
            if self.threshold is None and self.steps < blocks:
                raise NanoLladaError(
                    f"--gen-steps {self.steps} is fewer than the {blocks} blocks to decode; use at least one step per block"
                )
        elif block <= 0 or self.gen_length % block:
            raise NanoLladaError(
                f"--block-length {block} does not divide the generation length {self.gen_length}; "
                f"choose a divisor of {self.gen_length} (e.g. {self.gen_length}) or change --max-new-tokens"
            )
        if self.threshold is None and not self.block_causal and self.steps < self.gen_length // block:
            raise NanoLladaError(
                f"--gen-steps {self.steps} is fewer than the {self.gen_length // block} blocks; use at least one step per block"
            )
        if self.cache not in ("none", "prefix", "dual"):
            raise NanoLladaError(f"--cache must be none, prefix or dual, got '{self.cache}'")
        if self.cache != "none" and self.block_causal:
            raise NanoLladaError(
                "--cache prefix/dual is for bidirectional models; block-causal decoding already caches "
                "finished blocks exactly (use_kv_cache)"
            )
        if self.remasking not in ("low_confidence", "random"):
            raise NanoLladaError(f"--remasking must be low_confidence or random, got '{self.remasking}'")

    def decode_blocks(self, prompt_len: int) -> int:
        """Block-causal mode: how many blocks hold generated positions (the first may share the prompt's tail)."""
        return -(-(prompt_len + self.gen_length) // self.block_length) - prompt_len // self.block_length


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, gen_length] generated ids (EOS-filled after an early stop)
    nfe: int  # model forward passes (a CFG pair counts once: it is one batched call)
    commits: list[torch.Tensor] = field(default_factory=list)  # per step: tokens committed per row


def step_quotas(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's linear schedule: split each row's masked count over `steps` as evenly as possible,
    larger quotas first. Returns [B, steps]; every row sums to its masked count."""
    base = masked_count[:, None] // steps
    extra = torch.arange(steps, device=masked_count.device)[None, :] < (masked_count % steps)[:, None]
    return base + extra.long()


def _sampled_tokens(logits: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    # Gumbel-max in float64: argmax(l/T + g) is an exact sample from softmax(l/T).
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float64, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def _with_unconditional(view: torch.Tensor, start: int, prompt_len: int, mask_id: int, guided: bool) -> torch.Tensor:
    """Model input rows for canvas columns [start, ...); with CFG, stacked with a copy whose prompt is hidden
    (LLaDA's unsupervised classifier-free guidance)."""
    if not guided:
        return view
    unconditional = view.clone()
    unconditional[:, : max(0, prompt_len - start)] = mask_id
    return torch.cat([view, unconditional])


def _combine_guidance(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """u + (w + 1)(c - u) for logits stacked [conditional; unconditional]; unchanged (as float) when w = 0."""
    if cfg_scale == 0:
        return logits.float()
    cond, uncond = logits.float().chunk(2)
    return uncond + (cfg_scale + 1) * (cond - uncond)


def _guided_logits(model, canvas: torch.Tensor, prompt_len: int, mask_id: int, cfg_scale: float) -> torch.Tensor:
    rows = _with_unconditional(canvas, 0, prompt_len, mask_id, cfg_scale != 0)
    return _combine_guidance(model(rows, attention="bidirectional"), cfg_scale)


def _commit_top(scores: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Boolean [B, N]: the `quota[b]` highest-scoring positions of each row (scores of -inf never chosen)."""
    ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return (ranks < quota[:, None]) & torch.isfinite(scores)


def _choose_commits(
    logits: torch.Tensor,
    open_here: torch.Tensor,
    cfg: DiffusionSamplerConfig,
    quota: torch.Tensor | None,
    mask_id: int,
    generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions to commit now, candidate tokens) among the open positions, by quota or by threshold."""
    logits[..., mask_id] = float("-inf")  # the mask token is never a prediction
    candidates = _sampled_tokens(logits, cfg.temperature, generator)
    if cfg.remasking == "low_confidence":
        confidence = logits.softmax(-1).gather(-1, candidates[..., None]).squeeze(-1)
    else:
        confidence = torch.rand(open_here.shape, device=open_here.device, generator=generator)
    scores = confidence.masked_fill(~open_here, float("-inf"))
    if quota is None:  # threshold decoding: everything confident enough, and at least the best one
        commit = open_here & (confidence >= cfg.threshold)
        commit |= _commit_top(scores, open_here.any(1).long()) & ~commit.any(1, keepdim=True)
    else:
        commit = _commit_top(scores, quota)
    return commit, candidates


@torch.no_grad()
def diffusion_generate(
    model,
    prompt: torch.Tensor,
    cfg: DiffusionSamplerConfig,
    mask_id: int,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> SampleResult:
    """Generate cfg.gen_length tokens after `prompt` [B, P].

    `prompt_lengths` [B]: the prompts are left-padded (model.padding.left_pad) and row b's prompt is its last
    prompt_lengths[b] columns; None means every row is a full-width prompt.

    `on_block(k, tokens)` is called after block k is final with that block's generated ids [B, n] (for streaming).
    With eos_id and cfg.stop_at_eos, a row whose finished blocks hold an EOS is done: the rest of it is EOS
    padding and it leaves the batch, so later blocks cost only the rows still writing.
    """
    B, P = prompt.shape
    cfg.validate(P)
    if prompt_lengths is not None:
        prompt_lengths = prompt_lengths.to(prompt.device)
    padded = prompt_lengths is not None and bool((prompt_lengths != P).any())
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = int(prompt_lengths.max()) if padded else P
    if limit is not None and longest + cfg.gen_length > limit:
        raise NanoLladaError(
            f"a prompt of {longest} tokens plus {cfg.gen_length} new ones exceeds the model's {limit} positions; "
            f"shorten the prompt or generate fewer tokens"
        )
    if cfg.block_causal:
        if padded:  # blocks are aligned to each prompt's first token, so rows of other lengths need other blocks
            raise NanoLladaError(
                "block-causal decoding batches prompts of equal length only; group the prompts by length"
            )
        return _block_causal_generate(model, prompt, cfg, mask_id, eos_id, generator, on_block)
    block = cfg.block_length or cfg.gen_length
    num_blocks = cfg.gen_length // block
    canvas = torch.cat(
        [prompt, torch.full((B, cfg.gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], dim=1
    )
    layout = PaddedLayout.build(prompt_lengths, P, canvas.shape[1]) if padded else None
    result = SampleResult(canvas[:, P:], 0)
    for k in range(num_blocks):
        lo, hi = P + k * block, P + (k + 1) * block
        block_steps = cfg.steps // num_blocks + (k < cfg.steps % num_blocks)
        writing = (canvas[:, lo:hi] == mask_id).any(1)  # rows that have not ended
        if writing.all():
            _decode_block(model, canvas, P, lo, hi, block_steps, cfg, mask_id, generator, result, None, layout)
        elif writing.any():
            rows = writing.nonzero().squeeze(1)
            view = canvas[rows]
            _decode_block(
                model,
                view,
                P,
                lo,
                hi,
                block_steps,
                cfg,
                mask_id,
                generator,
                result,
                rows,
                layout.select(rows) if layout is not None else None,
            )
            canvas[rows] = view
        if on_block is not None:
            on_block(k, canvas[:, lo:hi])
        if cfg.stop_at_eos and eos_id is not None:
            ended = (canvas[:, P:hi] == eos_id).any(1)
            canvas[ended, hi:] = eos_id  # that row is finished: the rest is EOS padding, not worth decoding
            if ended.all():
                break
    result.tokens = canvas[:, P:]
    return result


def _decode_block(
    model,
    canvas: torch.Tensor,
    P: int,
    lo: int,
    hi: int,
    block_steps: int,
    cfg: DiffusionSamplerConfig,
    mask_id: int,
    generator,
    result: SampleResult,
    rows: torch.Tensor | None,
    layout: PaddedLayout | None,
) -> None:
    """Unmask canvas[:, lo:hi] in place, by step quotas or by threshold, with or without an approximate cache.

    cache="none": every step is one forward over the whole canvas.
    cache="prefix"/"dual" (Fast-dLLM, section 3.5; approximate for a bidirectional model): the block's first step is a
    full forward whose keys/values are kept; later steps feed only block + suffix (prefix) or only the block (dual)
    and attend to the kept K/V, which go stale as the block fills in and are refreshed at the next block.
    `rows` are the indices of these rows in the full batch (None: all rows), for the per-step commit counts;
    `layout` says where the real tokens of left-padded rows are (None: no padding).
    """
    B, total, width = canvas.shape[0], canvas.shape[1], hi - lo
    guided = cfg.cfg_scale != 0
    layout = layout.repeat(2 if guided else 1) if layout is not None else None
    every_column = torch.arange(total, device=canvas.device)

    def forward(columns: torch.Tensor, start: int, keys: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """Logits for the canvas columns `columns` (the first is `start`; at their true positions), which see the keys
        at columns `keys`."""
        ids = _with_unconditional(canvas[:, columns], start, P, mask_id, guided)
        if layout is not None:
            return model(
                ids, attention=layout.key_mask(keys), kv_cache=kv_cache, positions=layout.positions[:, columns]
            )
        if kv_cache is None:
            return model(ids, attention="bidirectional")
        if cfg.cache == "prefix":  # natural column order: positions follow from the cache length
            return model(ids, attention="bidirectional", kv_cache=kv_cache)
        return model(ids, attention="bidirectional", kv_cache=kv_cache, positions=columns)

    def guide(logits: torch.Tensor) -> torch.Tensor:
        return _combine_guidance(logits, cfg.cfg_scale)

    # Dual cache: the refresh forward runs on the canvas reordered to [before block, after block, block] with each
    # token at its true position, so the cache ends up holding [prefix, suffix] K/V and the block's K/V, appended
    # last, can be cropped off after every step. Bidirectional attention does not care about key order.
    # (Key order: the cache holds canvas columns in `order`; the prefix cache keeps the natural order.)
    order = every_column
    if cfg.cache == "dual":
        order = torch.cat([every_column[:lo], every_column[hi:], every_column[lo:hi]])
    keep = {"prefix": lo, "dual": total - width}.get(cfg.cache)
    kv_cache = None
    for quota in _block_quotas(canvas, lo, hi, mask_id, block_steps, cfg.threshold):
        if cfg.cache == "none":
            logits = forward(every_column, 0, every_column)[:, lo:hi]
        elif kv_cache is None:  # refresh: one exact full forward, whose logits serve this step
            kv_cache = model.new_kv_cache(B * (2 if guided else 1), total)
            logits = forward(order, 0, order, kv_cache)
            logits = logits[:, lo:hi] if cfg.cache == "prefix" else logits[:, -width:]
            kv_cache.crop(keep)
        elif cfg.cache == "prefix":  # block + suffix at positions lo..total, over the cached prefix
            logits = forward(every_column[lo:], lo, every_column, kv_cache)[:, :width]
            kv_cache.crop(keep)
        else:  # only the block, at its true positions, over the cached prefix and suffix
            logits = forward(every_column[lo:hi], lo, order, kv_cache)
            kv_cache.crop(keep)
        result.nfe += 1
        counts = _commit_step(guide(logits), canvas, lo, hi, cfg, quota, mask_id, generator)
        if rows is not None:  # per-step counts always cover the whole batch (rows that have ended commit 0)
            counts = torch.zeros(result.tokens.shape[0], dtype=counts.dtype, device=counts.device).index_copy(
                0, rows, counts
            )
        result.commits.append(counts)


def _block_quotas(canvas: torch.Tensor, lo: int, hi: int, mask_id: int, block_steps: int, threshold: float | None):
    """For each step of block [lo, hi) that needs a forward pass, the per-row commit quota (None when decoding by
    threshold), until the block has no mask left. The caller commits into `canvas` in place between steps.
    Steps whose quotas are all zero are skipped: nothing to commit, so no forward pass."""
    quotas = step_quotas((canvas[:, lo:hi] == mask_id).sum(1), block_steps) if threshold is None else None
    step = 0
    while (canvas[:, lo:hi] == mask_id).any():
        if quotas is None:
            yield None
            continue
        if step >= block_steps:
            return  # cannot happen: quotas sum to the masked count
        quota = quotas[:, step]
        step += 1
        if quota.any():
            yield quota


def _commit_step(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    lo: int,
    hi: int,
    cfg: DiffusionSamplerConfig,
    quota: torch.Tensor | None,
    mask_id: int,
    generator,
) -> torch.Tensor:
    """Commit this step's tokens into canvas[:, lo:hi] in place; returns how many each row committed."""
    current = canvas[:, lo:hi]
    commit, candidates = _choose_commits(logits, current == mask_id, cfg, quota, mask_id, generator)
    canvas[:, lo:hi] = torch.where(commit, candidates.to(canvas.dtype), current)
    return commit.sum(1)


def _block_causal_generate(
    model, prompt: torch.Tensor, cfg: DiffusionSamplerConfig, mask_id: int, eos_id: int | None, generator, on_block
) -> SampleResult:
    """Block-by-block decoding under the block-causal mask; see the module docstring."""
    B, P = prompt.shape
    K, total = cfg.block_length, P + cfg.gen_length
    canvas = torch.cat(
        [prompt, torch.full((B, cfg.gen_length), mask_id, dtype=prompt.dtype, device=prompt.device)], dim=1
    )
    first_block, num_blocks = P // K, -(-total // K)  # blocks [first_block, num_blocks) hold generated positions
    decode_blocks = cfg.decode_blocks(P)
    guided = cfg.cfg_scale != 0
    prefix_block = torch.arange(total, device=canvas.device) // K

    def rows(view: torch.Tensor, start: int) -> torch.Tensor:
        return _with_unconditional(view, start, P, mask_id, guided)

    def guide(logits: torch.Tensor) -> torch.Tensor:
        return _combine_guidance(logits, cfg.cfg_scale)

    cache = model.new_kv_cache(B * (2 if guided else 1), total) if cfg.use_kv_cache else None
    result = SampleResult(canvas[:, P:], 0)
    if cache is not None and first_block > 0:  # the prompt's whole blocks, once
        lo = first_block * K
        model(rows(canvas[:, :lo], 0), attention=block_causal_mask(prefix_block[:lo]), kv_cache=cache)
        result.nfe += 1
    for k in range(first_block, num_blocks):
        lo, hi = k * K, min((k + 1) * K, total)
        block_steps = cfg.steps // decode_blocks + (k - first_block < cfg.steps % decode_blocks)
        for quota in _block_quotas(canvas, lo, hi, mask_id, block_steps, cfg.threshold):
            if cache is None:  # reference path: the whole prefix under the block-causal mask
                logits = model(rows(canvas[:, :hi], 0), attention=block_causal_mask(prefix_block[:hi]))[:, lo:hi]
            else:  # the block sees every cached (earlier) position and itself; its K/V are dropped again
                logits = model(rows(canvas[:, lo:hi], lo), attention="bidirectional", kv_cache=cache)
                cache.crop(lo)
            result.nfe += 1
            result.commits.append(_commit_step(guide(logits), canvas, lo, hi, cfg, quota, mask_id, generator))
        if on_block is not None:
            on_block(k - first_block, canvas[:, max(lo, P) : hi])
        ended = cfg.stop_at_eos and eos_id is not None and (canvas[:, P:hi] == eos_id).any(1).all()
        if ended:
            canvas[:, hi:] = eos_id
            break
        if cache is not None and hi < total:  # the block is final: now its K/V may join the cache
            model(rows(canvas[:, lo:hi], lo), attention="bidirectional", kv_cache=cache)
            result.nfe += 1
    result.tokens = canvas[:, P:]
    return result


def strip_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS: LLaDA pads the canvas with EOS."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
