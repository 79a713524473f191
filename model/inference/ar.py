"""AR decoding: KV-cached sampling, one prompt or a left-padded batch. The AR loss is model/objectives/ar_loss.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from model.errors import MAX_TEMPERATURE, NanoLladaError, check_setting
from model.inference.padding import PaddedLayout, left_pad


@dataclass(frozen=True)
class ARSamplerConfig:
    """How AR decoding draws each next token: greedy at temperature 0, else top-k / nucleus sampling; `banned_ids`
    (e.g. <|mask|>) are never drawn."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    banned_ids: tuple[int, ...] = ()

    def draw(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token id per row of logits [B, V] (banned columns are set to -inf in place)."""
        if self.banned_ids:
            logits[:, list(self.banned_ids)] = float("-inf")
        if self.temperature <= 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    def validate(self) -> None:
        """Refuse settings that cannot be sampled with (a model.errors.SettingError naming the field)."""
        check_setting("temperature", self.temperature, 0, high=MAX_TEMPERATURE)
        check_setting("top_k", self.top_k, 0)
        check_setting("top_p", self.top_p, 0, high=1, above_low=True)

    def check_arguments(self, max_new_tokens: int | None = None) -> None:
        """The check of settings a user gave (eval flags and server request fields share it)."""
        self.validate()
        if max_new_tokens is not None:
            check_setting("max_new_tokens", max_new_tokens, 1)


GREEDY = ARSamplerConfig()


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: ARSamplerConfig = GREEDY,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1). With use_cache, each step feeds only the newest token.

    Stops after eos_id (which is yielded) or max_new_tokens, or at the model's position limit.
    """
    sampler.validate()
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, limit - len(prompt_ids))
    ids = torch.tensor([prompt_ids], device=device)
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None
    feed = ids
    for _ in range(max_new_tokens):
        logits = model(feed, attention="causal", kv_cache=cache)[:, -1]
        token = sampler.draw(logits, generator)
        yield int(token)
        if eos_id is not None and int(token) == eos_id:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        feed = token[:, None] if use_cache else ids


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampler: ARSamplerConfig = GREEDY,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New ids for each prompt (any lengths), decoded together with one KV cache; each list ends at its EOS.

    Prompts are left-padded (model/inference/padding.py): padding is masked out and positions start at each prompt's
    first token, so greedy decoding gives every row what `generate` gives it alone. A row that wrote EOS or reached the
    model's position limit stops; the batch stops when every row has. `on_step(tokens)` is called with each step's
    new ids [B] (-1 in rows that have stopped), for streaming.
    """
    sampler.validate()
    device = next(model.parameters()).device
    ids, lengths = left_pad(prompts, pad_id, device)
    B, P = ids.shape
    limit = model.config.max_position_embeddings
    if int(lengths.max()) >= limit:
        raise NanoLladaError(
            f"a prompt of {int(lengths.max())} tokens leaves no room in the model's {limit} positions; shorten it"
        )
    budget = (limit - lengths).clamp(min=0, max=max_new_tokens)  # new tokens each row may write
    steps = int(budget.max())
    layout = PaddedLayout.build(lengths, P, P + steps)
    padded = bool((lengths != P).any())  # equal lengths: plain causal attention, the flash path
    cache = model.new_kv_cache(B, P + steps)
    if padded:  # causal over real keys; a padding query sees only itself (its output is never used)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        attention = ((causal & layout.real[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device))[:, None]
        logits = model(ids, attention=attention, kv_cache=cache, positions=layout.positions[:, :P])[:, -1]
    else:
        logits = model(ids, attention="causal", kv_cache=cache)[:, -1]
    written = torch.full((B, max(steps, 1)), -1, dtype=torch.long, device=device)  # -1: nothing written there
    running = budget > 0
    for step in range(steps):
        token = sampler.draw(logits, generator)
        written[:, step] = token.masked_fill(~running, -1)
        if on_step is not None:
            on_step(written[:, step])
        running &= (step + 1 < budget) & (token != eos_id if eos_id is not None else True)
        if not running.any():
            break
        column = P + step
        if padded:
            positions = layout.positions[:, column : column + 1].clamp(max=limit - 1)  # rows past their limit are done
            logits = model(
                token[:, None],
                attention=layout.key_mask(torch.arange(column + 1, device=device)),
                kv_cache=cache,
                positions=positions,
            )[:, -1]
        else:
            logits = model(token[:, None], attention="causal", kv_cache=cache)[:, -1]
    return [[t for t in row if t >= 0] for row in written.tolist()]
