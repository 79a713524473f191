"""The engine of the OpenAI-compatible chat server (scripts.serve): a request's JSON, checked field by field against
the typed ChatRequest dataclass, becomes the request the batching worker (batching.py) decodes; http.py serves it.

Every mistake in a request is a RequestError, answered as a 4xx with OpenAI's error body; the server keeps serving.
The sampler settings are checked by the samplers' own check_arguments, as the eval scripts check their flags, so both
refuse the same values with the same words. A prompt plus max_tokens beyond the model's positions (or --seq-len) is a
400 (context_length_exceeded) naming the most that fits; without max_tokens the default is lowered to fit.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import get_args

from model.errors import SettingError
from model.inference.ar import ARSamplerConfig
from model.inference.sampling import DiffusionSamplerConfig, sampler_for_checkpoint
from model.tokenizer import chat_text, encode, mask_token_id
from scripts.common.serving.batching import BatchWorker, Job
from scripts.common.settings import flag

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # developer: new system
# The request field of each sampler parameter, for the library's messages (model.errors.SettingError).
REQUEST_FIELDS = {"gen_length": "max_tokens", "max_new_tokens": "max_tokens", "block_size": "block_length"}
JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object"}
JSON_TYPES[list] = "an array"


class RequestError(Exception):
    """A request the client must fix: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """The request fields the server reads (OpenAI's, plus top_k and diffusion's steps, block_length, threshold),
    each with its JSON type; other fields are ignored. The sampling fields are also the server's flags
    (scripts/common/settings.py), which set their defaults."""

    messages: list | None = None
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    max_tokens: int = flag(256, "new tokens when a request gives none (lowered to fit the context)", low=1)
    max_completion_tokens: int | None = None  # OpenAI's new name for max_tokens
    temperature: float | None = flag(None, "default: 0.8 for AR, 0 (greedy) for diffusion", low=0, kind=float)
    top_k: int = flag(20, "AR top-k (0: off)", low=0)
    top_p: float = flag(1.0, "AR nucleus mass", low=0, high=1, above_low=True)
    steps: int | None = flag(None, "diffusion forward passes (default: one per token)", "--gen-steps", kind=int)
    block_length: int | None = flag(32, "diffusion block size, capped at the generation length (0: one block)", low=0)
    threshold: float | None = flag(None, "diffusion: commit every token at least this confident", kind=float)
    prompt_ids: list[int] = field(default_factory=list, init=False)  # what parse() made of the messages
    sampler: DiffusionSamplerConfig | None = field(default=None, init=False)  # diffusion only

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


# The JSON fields (prompt_ids and sampler are made by parse()), each with its type: the annotation without None.
JSON_KINDS = {f.name: [t for t in get_args(f.type) or (f.type,) if t is not type(None)][0] for f in fields(ChatRequest)
              if f.init}  # fmt: skip


def typed(name: str, value, kind: type):
    """`value` if it is JSON of `kind` (a number field takes integers too, as a float), else a RequestError."""
    if not isinstance(value, (int, float) if kind is float else kind) or (isinstance(value, bool) and kind is not bool):
        raise RequestError(f"'{name}' must be {JSON_TYPES[kind]}, got {type(value).__name__}", name)
    try:
        return float(value) if kind is float else value
    except OverflowError:  # a JSON integer past float's range
        raise RequestError(f"'{name}' {value} is too large", name) from None


def request_fields(body) -> dict:
    """The ChatRequest fields a JSON body gives (null: not given), each checked against its field's type."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return {name: typed(name, body[name], kind) for name, kind in JSON_KINDS.items() if body.get(name) is not None}


def message_turn(message, index: int) -> dict:
    """One message as a chat-template turn; content parts must all be text (the model reads text only)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with 'role' and 'content'", "messages")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)}", "messages")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"{where}.content: only text parts {{'type': 'text', 'text'}} are read", "messages")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", "messages")
    return {"role": ROLES[role], "content": content}


@contextlib.contextmanager
def worded(max_tokens: str):
    """Reword the samplers' complaints about their parameters as complaints about the request's fields."""
    names = {**REQUEST_FIELDS, "gen_length": max_tokens, "max_new_tokens": max_tokens}
    try:
        yield
    except SettingError as err:
        raise RequestError(err.worded(names), names.get(err.param, err.param)) from None


class ChatEngine:
    """A loaded model with its tokenizer: checks requests and generates for them, batching the ones that wait together
    (up to `max_batch`). `defaults`: a ChatRequest holding the server's settings; `seq_len` caps diffusion's canvas."""

    def __init__(self, model, tokenizer, checkpoint, model_id: str, defaults: ChatRequest, max_batch: int, seq_len):
        self.model, self.tokenizer, self.checkpoint, self.model_id = model, tokenizer, checkpoint, model_id
        self.kind, self.created = checkpoint.kind, int(time.time())
        if defaults.temperature is None:
            defaults = replace(defaults, temperature=0.8 if self.kind == "ar" else 0.0)
        self.defaults = defaults
        self.worker = BatchWorker(model, mask_token_id(tokenizer), max_batch)
        self.limit = model.config.max_position_embeddings
        if self.kind == "diffusion" and seq_len:
            self.limit = min(self.limit, seq_len)

    def parse(self, body) -> ChatRequest:
        given = request_fields(body)
        r = replace(self.defaults, **given)
        if not r.messages:
            raise RequestError("'messages' must be a non-empty array of {'role', 'content'} objects", "messages")
        turns = [message_turn(m, i) for i, m in enumerate(r.messages)]
        if r.n != 1:
            raise RequestError("only n=1 is supported", "n")
        typed("include_usage", (r.stream_options or {}).get("include_usage", False), bool)
        if r.seed is not None and not -(2**63) <= r.seed < 2**64:  # what a torch.Generator takes
            raise RequestError(f"'seed' must fit in 64 bits, got {r.seed}", "seed")
        name = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
        with worded(name):  # the check the eval scripts give their flags
            ARSamplerConfig(r.temperature, r.top_k, r.top_p).check_arguments(given.get(name))

        r.prompt_ids = encode(self.tokenizer, chat_text(self.tokenizer, turns, add_generation_prompt=True))
        room = self.limit - len(r.prompt_ids)
        context = f"the {len(r.prompt_ids)}-token prompt leaves {max(room, 0)} of the {self.limit}-token context"
        if room <= 0:
            raise RequestError(f"{context}; shorten the messages", "messages", code="context_length_exceeded")
        if given.get(name, 0) > room:
            message = f"'{name}' {given[name]} is too long: {context}; ask for at most {room}"
            raise RequestError(message, name, code="context_length_exceeded")
        r.max_tokens = given.get(name, min(r.max_tokens, room))
        if self.kind == "diffusion":
            if given.get("block_length", 1) < 1:
                raise RequestError(f"'block_length' must be >= 1, got {r.block_length}", "block_length")
            with worded(name):
                r.sampler = self.sampler_for(r, len(r.prompt_ids))
            if r.sampler.gen_length > room:
                message = f"max_tokens {r.max_tokens} in whole blocks of {r.sampler.block_size} is "
                message += f"{r.sampler.gen_length}, over the {room} left; use a block_length that divides max_tokens"
                raise RequestError(message, "block_length")
        return r

    def sampler_for(self, r: ChatRequest, prompt_len: int | None = None) -> DiffusionSamplerConfig:
        """The diffusion settings of request `r`, checked as the eval scripts check their flags. A block-trained
        checkpoint decodes block-causally with its own block size from the prompt's first token, so any length works;
        otherwise the generation is rounded up to whole blocks (the tail past max_tokens is dropped). `steps` None
        means one step per token (0 is kept, for check_arguments to refuse)."""
        block_size = min(r.block_length or r.max_tokens, r.max_tokens)
        asked = DiffusionSamplerConfig(r.max_tokens, r.max_tokens, block_size, r.temperature, threshold=r.threshold)
        sampler = sampler_for_checkpoint(self.checkpoint, asked)
        length = r.max_tokens if sampler.block_causal else math.ceil(r.max_tokens / block_size) * block_size
        sampler = replace(sampler, gen_length=length, steps=length if r.steps is None else r.steps)
        sampler.check_arguments(prompt_len)
        return sampler

    def complete(self, request: ChatRequest, emit, gone=None) -> tuple[str, int] | None:
        """Generate for one request, calling emit(text) with each printable delta; returns (finish_reason,
        completion tokens), or None when `gone()` said the client had left (its generation then stops)."""
        return self.worker.submit(Job(request, self.tokenizer, gone)).wait(emit)

    def close(self) -> None:
        self.worker.close()
