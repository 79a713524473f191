"""Self-speculative decoding: the diffusion decoder of a checkpoint drafts k tokens, one causal pass of the same
weights verifies them, and the output is that checkpoint's AR greedy output (model/inference/ar.py), token for token.

A round, with every committed column before n in the AR KV cache exactly as AR decoding computes it and the newest
committed token (`pending`) at column n:
1. draft: [pending, <|mask|> x k] at columns n..n+k over the cache, attending to every cached column and to each
   other: the diffusion decoder's view of a block, with the causal cache as its clean context (or, with
   draft_context "full", the whole canvas up to the block, bidirectional and uncached, as a bidirectional model is
   trained). `draft_steps` forwards fill the masks, most confident first; each time the cache is cropped back to n.
2. verify: [pending, d_1..d_k] causally over the cache. Output i is the AR model's greedy token g_i for column
   n + i + 1, so a row accepts its longest prefix with d_i = g_(i-1). The batch takes the shortest such prefix, a,
   and every row commits d_1..d_a and its own g_a: all of them the argmax of a causal output over exact causal
   keys and values, which is AR greedy decoding. The cache keeps columns n..n+a; the new pending token is g_a.
With `draft_in_verify` the verify pass also feeds k + 1 masks after the drafts, which see the drafts and each other
but are seen by none of them, so the verifier's outputs are unchanged. When every draft is accepted, those masks
stand where the next block goes and their outputs are its drafts: the next round skips step 1. With `redraft` off it
always skips it: after a rejection the next drafts are the verify pass's guesses past it (its causal outputs, then the
masks'), conditioned on a rejected token, so weaker, but every round is then one forward.

Forward passes are counted as they run: the prefill (AR's first forward), every draft pass, every verify pass.
Prompts of different lengths are left-padded (model/inference/padding.py) and decode as they would alone (up to the
rounding of a batched, (k + 1)-column forward against AR's one-column steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.errors import NanoLladaError, SettingError, check_setting
from model.inference.padding import PaddedLayout, left_pad
from model.logit_shift import is_shifted

DRAFT_CONTEXTS = ("cache", "full")


@dataclass(frozen=True)
class SpeculativeConfig:
    draft_length: int = 8  # k: tokens drafted per round (the block the diffusion decoder fills)
    draft_steps: int = 1  # diffusion forwards per draft (1: every mask at once)
    draft_in_verify: bool = True  # draft the next block in the verify pass (used when every draft is accepted)
    # After a round that rejected a draft: a draft pass (True), or (False, with draft_in_verify) the verify pass's own
    # guesses past the rejection, its causal outputs then its masks' (Jacobi-style: stale, but no draft pass).
    redraft: bool = True
    # What the drafter sees: "cache", the block over the AR KV cache (a pass costs the block's columns); "full", the
    # whole canvas bidirectionally and uncached, as a bidirectional diffusion model is trained (a pass costs them all).
    draft_context: str = "cache"

    def validate(self) -> None:
        check_setting("draft_length", self.draft_length, 1)
        check_setting("draft_steps", self.draft_steps, 1, high=self.draft_length)
        if not (self.redraft or self.draft_in_verify):
            raise SettingError("{redraft} False takes the next drafts from the verify pass: it needs {draft_in_verify}")
        if self.draft_context not in DRAFT_CONTEXTS:
            raise SettingError(
                f"{{draft_context}} must be one of {', '.join(DRAFT_CONTEXTS)}, got '{self.draft_context}'"
            )


@dataclass
class SpeculativeResult:
    tokens: list[list[int]]  # each row's new ids, ending with EOS if it wrote one
    draft_forwards: int = 0
    verify_forwards: int = 0  # the prefill included
    accepted: list[int] = field(default_factory=list)  # drafts kept by each verify pass (the batch's shortest)

    @property
    def forwards(self) -> int:
        return self.draft_forwards + self.verify_forwards


class _Decoder:
    """The canvas, the cache and the attention rules of one speculative decoding (see the module docstring)."""

    def __init__(self, model, prompts, width_after_prompt: int, pad_id: int, banned: tuple[int, ...]):
        self.model, self.banned, self.pad_id = model, list(banned), pad_id
        device = next(model.parameters()).device
        ids, lengths = left_pad(prompts, pad_id, device)
        self.batch, self.prompt_width = ids.shape
        width = self.prompt_width + width_after_prompt
        if width > model.config.max_position_embeddings:
            raise NanoLladaError(
                f"a prompt of {self.prompt_width} tokens plus the new tokens and two draft blocks needs {width} "
                f"positions; the model has {model.config.max_position_embeddings}: shorten the prompt or generate less"
            )
        self.layout = PaddedLayout.build(lengths, self.prompt_width, width)
        self.canvas = torch.full((self.batch, width), pad_id, dtype=torch.long, device=device)
        self.canvas[:, : self.prompt_width] = ids
        self.cache = model.new_kv_cache(self.batch, width)
        self.shift = 1 if is_shifted(model) else 0

    def forward(self, start: int, ids: torch.Tensor, causal_queries: int) -> torch.Tensor:
        """Logits of `ids` [B, T] at canvas columns start..start+T over the cache (which must hold columns < start):
        the first `causal_queries` see the keys up to their own column, the rest see every key; padding never."""
        T = ids.shape[1]
        keys = torch.arange(start + T, device=ids.device)
        query = start + torch.arange(T, device=ids.device)
        rule = (keys[None, :] <= query[:, None]) | (torch.arange(T, device=ids.device) >= causal_queries)[:, None]
        allowed = (rule[None] & self.layout.real[:, None, : start + T]) | (keys[None, :] == query[:, None])[None]
        positions = self.layout.positions[:, start : start + T]
        return self.model(ids, attention=allowed[:, None], kv_cache=self.cache, positions=positions)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned:
            logits = logits.clone()
            logits[..., self.banned] = float("-inf")
        return logits.argmax(-1)

    def guesses_ahead(self, logits: torch.Tensor, guesses: torch.Tensor, k: int, mask_id: int) -> torch.Tensor:
        """[B, 2k + 1] guesses for columns n+1..n+2k+1 from a verify pass with masks at columns n+k+1..: the causal
        outputs' for n+1..n+k+1, then the masks' (read one column left when shifted)."""
        masks = logits[:, k + 2 - self.shift : 2 * k + 2 - self.shift].float()
        masks[..., [mask_id, *self.banned]] = float("-inf")
        return torch.cat([guesses, masks.argmax(-1)], dim=1)

    def draft(self, n: int, k: int, steps: int, mask_id: int, full: bool = False) -> torch.Tensor:
        """Drafts [B, k] for columns n+1..n+k, in `steps` bidirectional passes of the block over the cache, or
        (`full`) of the whole canvas up to the block, uncached."""
        window = self.canvas[:, n : n + k + 1].clone()
        window[:, 1:] = mask_id
        for step in range(steps):
            if full:
                ids = torch.cat([self.canvas[:, :n], window], dim=1)
                attention = self.layout.key_mask(torch.arange(n + k + 1, device=ids.device))
                logits = self.model(ids, attention=attention, positions=self.layout.positions[:, : n + k + 1])[:, n:]
            else:
                logits = self.forward(n, window, causal_queries=0)
                self.cache.crop(n)
            logits = logits[:, 1 - self.shift : k + 1 - self.shift].float()
            logits[..., [mask_id, *self.banned]] = float("-inf")
            confidence, guess = logits.softmax(-1).max(-1)
            masked = window[:, 1:] == mask_id
            quota = -(-int(masked[0].sum()) // (steps - step))  # every row has as many masks left
            confidence = confidence.masked_fill(~masked, -1.0)
            chosen = torch.zeros_like(masked).scatter(1, confidence.topk(quota, dim=1).indices, True) & masked
            window[:, 1:] = torch.where(chosen, guess, window[:, 1:])
        return window[:, 1:]


@torch.no_grad()
def speculative_generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    mask_id: int,
    config: SpeculativeConfig = SpeculativeConfig(),
    eos_id: int | None = None,
    pad_id: int = 0,
    banned_ids: tuple[int, ...] = (),
) -> SpeculativeResult:
    """Each prompt's greedy AR continuation (up to max_new_tokens, ending at EOS), drafted by the diffusion decoder
    and verified causally. `banned_ids` are never chosen by the verifier (as ARSamplerConfig.banned_ids)."""
    config.validate()
    check_setting("max_new_tokens", max_new_tokens, 1)
    k = config.draft_length
    run = _Decoder(model, prompts, max_new_tokens + 2 * k + 2, pad_id, tuple(banned_ids))
    result = SpeculativeResult([])
    P = n = run.prompt_width
    run.canvas[:, n] = run.pick(run.forward(0, run.canvas[:, :P], causal_queries=P)[:, -1])
    result.verify_forwards += 1
    done = run.canvas[:, n] == eos_id if eos_id is not None else torch.zeros_like(run.canvas[:, n], dtype=torch.bool)
    drafts = None
    while n - P + 1 < max_new_tokens and not done.all():
        if drafts is None:
            drafts = run.draft(n, k, config.draft_steps, mask_id, full=config.draft_context == "full")
            result.draft_forwards += config.draft_steps
        run.canvas[:, n + 1 : n + k + 1] = drafts
        window = run.canvas[:, n : n + k + 1]
        if config.draft_in_verify:
            window = torch.cat([window, window.new_full((run.batch, k + 1), mask_id)], dim=1)
        logits = run.forward(n, window, causal_queries=k + 1)
        result.verify_forwards += 1
        guesses = run.pick(logits[:, : k + 1])
        agree = (drafts == guesses[:, :k]).long().cumprod(1).sum(1)
        a = int(agree[~done].min())
        run.canvas[:, n + a + 1] = guesses[:, a]
        run.canvas[:, n + a + 2 :] = pad_id  # the rejected drafts
        run.cache.crop(n + a + 1)
        result.accepted.append(a)
        drafts = None
        if config.draft_in_verify and (a == k or not config.redraft):
            drafts = run.guesses_ahead(logits, guesses, k, mask_id)[:, a + 1 : a + k + 1]
        if eos_id is not None:
            done |= (run.canvas[:, n + 1 : n + a + 2] == eos_id).any(1)
        n += a + 1
    for row in run.canvas[:, P : min(n + 1, P + max_new_tokens)].tolist():
        result.tokens.append(row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row)
    return result
