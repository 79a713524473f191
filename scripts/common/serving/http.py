"""The HTTP side of the OpenAI-compatible chat server (scripts.serve): routes, JSON replies and SSE streams
around a ChatEngine (scripts/common/serving/engine.py).

A request's generation stops when its client disconnects: the engine asks `client_gone` before every decoding step
(the connection is readable with nothing to read once the client has closed it), and a stream write that fails
cancels it too. A client that half-closes its sending side after the request is therefore taken as gone.
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from model.errors import NanoLladaError
from scripts.common.serving.engine import ChatEngine, ChatRequest, RequestError

MAX_BODY_BYTES = 4 << 20


class ClientLeft(Exception):
    """The client closed its connection before its request's body was read."""


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

    def client_gone(self) -> bool:
        """Has the client closed the connection? (HTTP/1.0: it sends nothing after its request, so a readable
        connection with no data left means it has.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

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
        except ClientLeft:  # nobody to answer: writing would only raise (and print) a broken pipe
            self.close_connection = True
            return None
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
        try:
            raw = self.rfile.read(length)
        except ConnectionError:
            raise ClientLeft from None
        if len(raw) < length:  # the connection closed before the whole body came
            raise ClientLeft
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
            result = self.engine.complete(request, pieces.append, self.client_gone)
        except Exception as err:  # a bug, not the client's fault: answer 500 and keep serving
            return self._send_error(RequestError(f"generation failed: {err.__class__.__name__}: {err}", status=500))
        if result is None:  # the client has left: nobody to answer
            return
        finish, count = result
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
            result = self.engine.complete(request, lambda text: event({"content": text}), self.client_gone)
            if result is None:  # the client has left
                return
            finish, count = result
            event({}, finish)
            if request.include_usage:  # OpenAI: a last chunk with empty choices carries the usage
                event({}, usage=self._usage(request, count), choices=False)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was cancelled (Job.wait) and the worker moves on
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
    server_class = type("ChatServer", (ThreadingHTTPServer,), {"request_queue_size": 128})  # the default 5 drops
    server = server_class((host, port), handler)  # connections when many clients connect at once
    server.daemon_threads = True
    return server
