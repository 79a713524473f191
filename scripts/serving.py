"""The OpenAI-compatible chat server behind scripts.serve: request validation, generation, HTTP.

One model, one lock: requests are parsed and validated concurrently, generation runs one at a time.
Every mistake in a request is a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}});
the server keeps serving. AR models stream token by token, diffusion models stream each finished block.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from model.ar import generate
from model.errors import NanoLladaError
from model.sampling import DiffusionSamplerConfig, diffusion_generate
from model.tokenizer import EOS_ID, StreamingDecoder, chat_text, encode, mask_token_id

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}  # developer: OpenAI's new name for system
MAX_BODY_BYTES = 4 << 20


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
    block_length: int | None = 32  # diffusion block size (capped at the generation length)
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
    sampler: DiffusionSamplerConfig | None  # diffusion only; gen_length is max_tokens rounded up to whole blocks


def _field(body: dict, name: str, types, default=None, minimum=None, maximum=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got a boolean", name)
    if not isinstance(value, types):
        raise RequestError(f"'{name}' must be {_type_names(types)}, got {type(value).__name__}", name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise RequestError(f"'{name}' must be {bounds}, got {value}", name)
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


class ChatEngine:
    """A loaded model with its tokenizer: validates requests and generates (one at a time) for them."""

    def __init__(
        self,
        model,
        tokenizer,
        kind: str,
        model_id: str,
        defaults: Defaults | None = None,
        trained_block_size: int | None = None,
    ):
        self.model, self.tokenizer, self.kind, self.model_id = model, tokenizer, kind, model_id
        self.trained_block_size = trained_block_size  # block-trained diffusion: decoded block-causally with this size
        self.defaults = defaults or Defaults()
        self.mask_id = mask_token_id(tokenizer)
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.limit = model.config.max_position_embeddings
        if kind == "diffusion" and self.defaults.seq_len:
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
        temperature = float(_field(body, "temperature", (int, float), default_temperature, minimum=0, maximum=2))
        top_p = float(_field(body, "top_p", (int, float), d.top_p, minimum=0, maximum=1))
        if top_p <= 0:
            raise RequestError("'top_p' must be above 0 (1 = off)", "top_p")
        top_k = _field(body, "top_k", int, d.top_k, minimum=0)
        seed = _field(body, "seed", int)

        prompt = encode(self.tokenizer, chat_text(self.tokenizer, turns, add_generation_prompt=True))
        room = self.limit - len(prompt)
        if room <= 0:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens, which leaves no room in this model's {self.limit}-token "
                "context; shorten the messages",
                "messages",
                code="context_length_exceeded",
            )
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, name, int, None, minimum=1)
        if max_tokens is None:
            max_tokens = min(d.max_tokens, room)
        elif max_tokens > room:
            raise RequestError(
                f"'{name}' {max_tokens} plus the {len(prompt)}-token prompt exceeds this model's {self.limit}-token "
                f"context; ask for at most {room}",
                name,
                code="context_length_exceeded",
            )
        sampler = self._sampler(body, max_tokens, room, temperature, len(prompt)) if self.kind == "diffusion" else None
        return ChatRequest(prompt, max_tokens, temperature, top_k, top_p, stream, include_usage, seed, sampler)

    def _sampler(
        self, body: dict, max_tokens: int, room: int, temperature: float, prompt_len: int
    ) -> DiffusionSamplerConfig:
        d = self.defaults
        if (
            self.trained_block_size
        ):  # block-causal: blocks start at the prompt's first token, as in training; any length works
            block, gen_length = self.trained_block_size, max_tokens
        else:
            block = _field(body, "block_length", int, d.block_length, minimum=1)
            block = min(block or max_tokens, max_tokens)
            gen_length = math.ceil(max_tokens / block) * block  # whole blocks; the tail past max_tokens is dropped
            if gen_length > room:
                raise RequestError(
                    f"max_tokens {max_tokens} rounded up to whole blocks of {block} is {gen_length} tokens, more than "
                    f"the {room} left in the context; choose a block_length that divides max_tokens",
                    "block_length",
                )
        steps = _field(body, "steps", int, d.steps, minimum=1)
        threshold = _field(body, "threshold", (int, float), d.threshold, minimum=0, maximum=1)
        cfg = DiffusionSamplerConfig(
            gen_length=gen_length,
            steps=steps or gen_length,
            block_length=block,
            temperature=temperature,
            threshold=None if threshold is None else float(threshold),
            block_causal=bool(self.trained_block_size),
        )
        try:
            cfg.validate(prompt_len)
        except NanoLladaError as err:
            raise RequestError(
                str(err).replace("--gen-steps", "steps").replace("--block-length", "block_length"), "steps"
            ) from None
        return cfg

    # ---- generation ----------------------------------------------------------------------------------------
    def complete(self, request: ChatRequest, emit) -> tuple[str, int]:
        """Generate for one request, calling emit(text) with each printable delta; returns (finish_reason, completion tokens)."""
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(request.seed) if request.seed is not None else None
        decoder = StreamingDecoder(self.tokenizer)
        state = {"count": 0, "finish": "length"}

        def push(tokens: list[int]) -> None:
            """Emit tokens up to EOS and max_tokens; later calls are ignored once finished."""
            if state["finish"] == "stop" or state["count"] >= request.max_tokens:
                return
            tokens = tokens[: request.max_tokens - state["count"]]
            if EOS_ID in tokens:
                tokens = tokens[: tokens.index(EOS_ID) + 1]
                state["finish"] = "stop"
            state["count"] += len(tokens)
            text = decoder.push([t for t in tokens if t != EOS_ID])
            if text:
                emit(text)

        with self.lock, torch.no_grad():
            if request.sampler is None:
                for token in generate(
                    self.model,
                    request.prompt_ids,
                    request.max_tokens,
                    request.temperature,
                    request.top_k,
                    request.top_p,
                    eos_id=EOS_ID,
                    banned_ids=(self.mask_id,),
                    generator=generator,
                ):
                    push([token])
            else:
                prompt = torch.tensor([request.prompt_ids], device=device)
                diffusion_generate(
                    self.model,
                    prompt,
                    request.sampler,
                    self.mask_id,
                    EOS_ID,
                    generator,
                    on_block=lambda _k, block: push(block[0].tolist()),
                )
        return state["finish"], state["count"]


class ChatHandler(BaseHTTPRequestHandler):
    """HTTP/1.0: one response per connection, so a stream simply ends when the connection closes."""

    server_version = "nano-llada"
    engine: ChatEngine  # set by make_server
    quiet = False

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.status, err.body())

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        engine = self.engine
        card = {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "nano-llada"}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [card]})
        elif path == f"/v1/models/{engine.model_id}":
            self._send_json(200, card)
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError(f"no route GET {path}; try GET /v1/models", status=404, code="not_found"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        if path != "/v1/chat/completions":
            return self._send_error(
                RequestError(f"no route POST {path}; use POST /v1/chat/completions", status=404, code="not_found")
            )
        try:
            request = self.engine.parse(self._read_json())
        except RequestError as err:
            return self._send_error(err)
        except NanoLladaError as err:  # e.g. a tokenizer without a chat template
            return self._send_error(RequestError(str(err)))
        except Exception as err:  # a bug, not the client's fault: answer 500 and keep serving
            return self._send_error(
                RequestError(f"could not read the request: {err.__class__.__name__}: {err}", status=500)
            )
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            self._stream(request, reply_id, created)
        else:
            self._reply(request, reply_id, created)

    def _read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError("Content-Length is not an integer") from None
        if length <= 0:
            raise RequestError("empty request body; send a JSON object")
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit", status=413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"request body is not valid JSON ({err})") from None

    def _usage(self, request: ChatRequest, completion_tokens: int) -> dict:
        prompt_tokens = len(request.prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _reply(self, request: ChatRequest, reply_id: str, created: int) -> None:
        pieces: list[str] = []
        try:
            finish, count = self.engine.complete(request, pieces.append)
        except Exception as err:  # a bug, not the client's fault: answer 500 and keep serving
            return self._send_error(RequestError(f"generation failed: {err.__class__.__name__}: {err}", status=500))
        self._send_json(
            200,
            {
                "id": reply_id,
                "object": "chat.completion",
                "created": created,
                "model": self.engine.model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": self._usage(request, count),
            },
        )

    def _stream(self, request: ChatRequest, reply_id: str, created: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def event(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> None:
            chunk = {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.engine.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if usage is not None or request.include_usage:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        try:
            event({"role": "assistant", "content": ""})
            finish, count = self.engine.complete(request, lambda text: event({"content": text}))
            event({}, finish)
            if request.include_usage:  # OpenAI: a last chunk with empty choices carries the usage
                event({}, usage=self._usage(request, count), choices=False)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the lock is released and the next request is served
        except Exception as err:  # headers are sent: report the failure as an error event, then end the stream
            failure = RequestError(f"generation failed: {err.__class__.__name__}: {err}", status=500).body()
            try:
                self.wfile.write(f"data: {json.dumps(failure)}\n\n".encode())
            except OSError:
                pass


def make_server(
    engine: ChatEngine, host: str = "127.0.0.1", port: int = 8998, quiet: bool = False
) -> ThreadingHTTPServer:
    """A threaded HTTP server (not yet serving) bound to host:port; port 0 picks a free one (server.server_address)."""
    handler = type("BoundChatHandler", (ChatHandler,), {"engine": engine, "quiet": quiet})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
