"""The engine of the OpenAI-compatible chat server (scripts.serve): request validation and generation.
The HTTP side is scripts/common/serving/http.py.

Requests are parsed and validated concurrently; generation runs in one worker thread that decodes the requests
waiting together as one batch (scripts/common/serving/batching.py) and stops a request whose client has gone.
Every mistake in a request is a RequestError, answered as a 4xx with OpenAI's error body
({"error": {"message", "type", "param", "code"}}); the server keeps serving. The sampler settings are checked by
the samplers' own check_arguments, as the eval scripts check their flags, so both refuse the same values.
max_tokens is capped by the context: a prompt plus max_tokens beyond the model's positions (or --seq-len) is a
400 (context_length_exceeded) naming the most that fits; without max_tokens the default is lowered to fit.
AR models stream token by token, diffusion models stream each finished block.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from model.errors import SettingError
from model.inference.ar import ARSamplerConfig
from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint
from model.tokenizer import chat_text, encode, mask_token_id
from scripts.common.serving.batching import BatchWorker, Job

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}  # developer: OpenAI's new name for system
# The request field of each sampler parameter, for the library's messages (model.errors.SettingError).
REQUEST_FIELDS = {
    "gen_length": "max_tokens",
    "max_new_tokens": "max_tokens",
    "steps": "steps",
    "block_size": "block_length",
    "threshold": "threshold",
}


class RequestError(Exception):
    """A request the client must fix: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Defaults:
    """Server-wide sampling settings; a request's own fields override them."""

    max_tokens: int = 256
    temperature: float | None = None  # None: 0.8 for AR, 0.0 (greedy) for diffusion
    top_k: int = 20
    top_p: float = 1.0
    steps: int | None = None  # diffusion forward passes over all blocks; None: one per token
    block_size: int | None = 32  # diffusion block size (capped at the generation length)
    threshold: float | None = None  # diffusion parallel decoding: commit every token at least this confident
    seq_len: int | None = None  # diffusion canvas limit (prompt + generation); None: max_position_embeddings


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stream: bool
    include_usage: bool
    seed: int | None
    sampler: DiffusionSamplerConfig | None  # diffusion only (bidirectional: max_tokens rounded up to whole blocks)


def _field(body: dict, name: str, types, default=None, minimum=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got a boolean", name)
    if not isinstance(value, types):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got {type(value).__name__}", name)
    if minimum is not None and value < minimum:
        raise RequestError(f"'{name}' must be >= {minimum}, got {value}", name)
    if isinstance(types, tuple) and float in types:  # a number field: as a float (JSON integers may be huge)
        try:
            return float(value)
        except OverflowError:
            raise RequestError(f"'{name}' {value} is too large", name) from None
    return value


def _type_names(types) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "an object",
        list: "an array",
    }
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(names[t] for t in types if not (t is int and float in types))


def _message_text(message, index: int) -> tuple[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with 'role' and 'content'", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}", "messages")
    if isinstance(content, list):  # content parts: only text can be rendered by a text-only model
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported", "messages"
                )
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")
    return ROLES[role], content


@contextlib.contextmanager
def request_fields(names: dict[str, str]):
    """Reword the samplers' complaints about their parameters as complaints about the request's fields."""
    try:
        yield
    except SettingError as err:
        raise RequestError(err.worded(names), names.get(err.param, err.param)) from None


class ChatEngine:
    """A loaded model with its tokenizer: validates requests and generates for them, batching the ones that wait
    together (up to `max_batch`)."""

    def __init__(self, model, tokenizer, checkpoint, model_id: str, defaults: Defaults | None = None, max_batch=16):
        self.model, self.tokenizer, self.checkpoint, self.model_id = model, tokenizer, checkpoint, model_id
        self.kind = checkpoint.kind
        self.defaults = defaults or Defaults()
        self.mask_id = mask_token_id(tokenizer)
        self.created = int(time.time())
        self.worker = BatchWorker(model, self.mask_id, max_batch)
        self.limit = model.config.max_position_embeddings
        if self.kind == "diffusion" and self.defaults.seq_len:
            self.limit = min(self.limit, self.defaults.seq_len)

    # ---- validation ----------------------------------------------------------------------------------------
    def parse(self, body) -> ChatRequest:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        _field(body, "model", str)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty array of {'role', 'content'} objects", "messages")
        turns = [dict(zip(("role", "content"), _message_text(m, i))) for i, m in enumerate(messages)]
        if _field(body, "n", int, 1, minimum=1) != 1:
            raise RequestError("only n=1 is supported", "n")
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, {})
        include_usage = _field(options, "include_usage", bool, False)
        d = self.defaults
        default_temperature = d.temperature if d.temperature is not None else (0.8 if self.kind == "ar" else 0.0)
        temperature = _field(body, "temperature", (int, float), float(default_temperature))
        top_p = _field(body, "top_p", (int, float), float(d.top_p))
        top_k = _field(body, "top_k", int, d.top_k)
        seed = _field(body, "seed", int)
        if seed is not None and not -(2**63) <= seed < 2**64:  # what a torch.Generator takes
            raise RequestError(f"'seed' must fit in 64 bits, got {seed}", "seed")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, name, int, None)
        fields = {**REQUEST_FIELDS, "gen_length": name, "max_new_tokens": name}
        with request_fields(fields):  # the check the eval scripts give their flags
            ARSamplerConfig(temperature, top_k, top_p).check_arguments(max_tokens)

        prompt = encode(self.tokenizer, chat_text(self.tokenizer, turns, add_generation_prompt=True))
        room = self.limit - len(prompt)
        if room <= 0:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens, which leaves no room in this model's {self.limit}-token "
                "context; shorten the messages",
                "messages",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(d.max_tokens, room)
        elif max_tokens > room:
            raise RequestError(
                f"'{name}' {max_tokens} plus the {len(prompt)}-token prompt exceeds this model's {self.limit}-token "
                f"context; ask for at most {room}",
                name,
                code="context_length_exceeded",
            )
        sampler = None
        if self.kind == "diffusion":
            with request_fields(fields):
                sampler = self._sampler(body, max_tokens, room, temperature, len(prompt))
        return ChatRequest(prompt, max_tokens, temperature, top_k, top_p, stream, include_usage, seed, sampler)

    def _sampler(self, body: dict, max_tokens: int, room: int, temperature: float, prompt_len: int):
        """A diffusion request's sampler from its fields (steps, block_length, threshold) and the defaults."""
        d = self.defaults
        steps = _field(body, "steps", int, d.steps)
        block_size = _field(body, "block_length", int, d.block_size, minimum=1)
        threshold = _field(body, "threshold", (int, float), d.threshold)  # a float, or None
        sampler = self.sampler_for(max_tokens, steps, block_size, temperature, threshold)
        sampler.check_arguments(prompt_len)
        if sampler.gen_length > room:
            raise RequestError(
                f"max_tokens {max_tokens} rounded up to whole blocks of {sampler.block_size} is "
                f"{sampler.gen_length} tokens, more than the {room} left in the context; choose a block_length "
                "that divides max_tokens",
                "block_length",
            )
        return sampler

    def sampler_for(
        self,
        max_tokens: int,
        steps: int | None = None,
        block_size: int | None = None,
        temperature: float = 0.0,
        threshold: float | None = None,
    ) -> DiffusionSamplerConfig:
        """The diffusion settings of a request for `max_tokens` new tokens. A block-trained
        checkpoint decodes block-causally with its own block size, from the prompt's first token, so any length
        works; otherwise the generation is rounded up to whole blocks (the tail past max_tokens is dropped).
        `steps` None means one step per token (0 is kept, for check_arguments to refuse)."""
        block_size = min(block_size or max_tokens, max_tokens)
        asked = DiffusionSamplerConfig(
            gen_length=max_tokens,
            steps=max_tokens if steps is None else steps,
            block_size=block_size,
            temperature=temperature,
            threshold=None if threshold is None else float(threshold),
        )
        sampler = sampler_for_checkpoint(self.checkpoint, asked)
        if sampler.block_causal:
            return sampler
        gen_length = math.ceil(max_tokens / block_size) * block_size
        return replace(sampler, gen_length=gen_length, steps=gen_length if steps is None else steps)

    # ---- generation ----------------------------------------------------------------------------------------
    def submit(self, request: ChatRequest, gone: Callable[[], bool] | None = None) -> Job:
        """Queue a request; `gone()` says whether its client has left (then its generation stops)."""
        return self.worker.submit(Job(request, self.tokenizer, gone))

    def complete(self, request: ChatRequest, emit, gone: Callable[[], bool] | None = None) -> tuple[str, int] | None:
        """Generate for one request, calling emit(text) with each printable delta; returns (finish_reason,
        completion tokens), or None when the client left (see submit)."""
        return self.submit(request, gone).wait(emit)

    def close(self) -> None:
        self.worker.close()
