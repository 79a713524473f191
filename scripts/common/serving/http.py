"""The HTTP side of the OpenAI-compatible chat server (scripts.serve): routes, JSON replies and SSE streams around a
ChatEngine (engine.py), on the standard library's threading HTTP server.

HTTP/1.0, one response per connection, so a stream simply ends when the connection closes. A request's generation
stops when its client disconnects: the engine asks `client_gone` before every decoding step (the connection is
readable with nothing to read once the client has closed it), and a stream write that fails cancels it too. A client
that half-closes its sending side after the request is therefore taken as gone.
"""

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


def usage(request: ChatRequest, completion_tokens: int) -> dict:
    prompt = len(request.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "nano-llada"
    engine: ChatEngine  # set by make_server
    quiet = False

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)

    def send_json(self, payload: dict, status: int = 200) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_event(self, payload) -> None:
        """One server-sent event: a JSON payload, or the literal [DONE]."""
        data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def client_gone(self) -> bool:
        """Has the client closed the connection? (It sends nothing after its request, so a readable connection with
        no data left means it has.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or already closed
            return True

    def fail(self, err: RequestError) -> None:
        self.send_json(err.body(), err.status)

    def do_GET(self):
        path, engine = self.path.split("?")[0].rstrip("/"), self.engine
        card = {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "nano-llada"}
        routes = {"/v1/models": {"object": "list", "data": [card]}, f"/v1/models/{engine.model_id}": card}
        if path not in routes:
            return self.fail(RequestError(f"no route GET {path}; try GET /v1/models", None, 404, "not_found"))
        self.send_json(routes[path])

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path != "/v1/chat/completions":
                raise RequestError(f"no route POST {path}; use POST /v1/chat/completions", None, 404, "not_found")
            request = self.engine.parse(self.read_json())
        except ClientLeft:  # nobody to answer: writing would only raise (and print) a broken pipe
            self.close_connection = True
            return
        except RequestError as err:
            return self.fail(err)
        except NanoLladaError as err:  # e.g. a tokenizer without a chat template
            return self.fail(RequestError(str(err)))
        except Exception as err:  # a bug, not the client's fault: answer 500 and keep serving
            return self.fail(RequestError(f"could not read the request: {err!r}", status=500))
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.engine.model_id}
        try:
            (self.stream if request.stream else self.answer)(request, reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; its generation was cancelled (Job.wait) and the worker moves on
        except Exception as err:  # a bug, not the client's fault: a 500, or an error event once a stream has begun
            failure = RequestError(f"generation failed: {err.__class__.__name__}: {err}", status=500).body()
            try:
                self.send_event(failure) if request.stream else self.send_json(failure, 500)
            except OSError:
                pass

    def read_json(self):
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

    def answer(self, request: ChatRequest, reply: dict) -> None:
        pieces: list[str] = []
        result = self.engine.complete(request, pieces.append, self.client_gone)
        if result is not None:  # None: the client has left, nobody to answer
            message = {"role": "assistant", "content": "".join(pieces)}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result[0]}
            reply |= {"object": "chat.completion", "choices": [choice], "usage": usage(request, result[1])}
            self.send_json(reply)

    def stream(self, request: ChatRequest, reply: dict) -> None:
        """AR streams token by token, diffusion each finished block; with include_usage every chunk carries a usage
        field and a last chunk with no choices gives it (OpenAI's convention)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        chunk = reply | {"object": "chat.completion.chunk"} | ({"usage": None} if request.include_usage else {})

        def delta(content: dict, finish: str | None = None) -> None:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
            self.send_event(chunk | {"choices": [choice]})

        delta({"role": "assistant", "content": ""})
        result = self.engine.complete(request, lambda text: delta({"content": text}), self.client_gone)
        if result is None:  # the client has left
            return
        delta({}, result[0])
        if request.include_usage:
            self.send_event(chunk | {"choices": [], "usage": usage(request, result[1])})
        self.send_event("[DONE]")


def make_server(engine: ChatEngine, host: str, port: int, quiet: bool):
    """A threaded HTTP server (not yet serving) bound to host:port; port 0 picks a free one (server.server_address)."""
    handler = type("BoundChatHandler", (ChatHandler,), {"engine": engine, "quiet": quiet})
    # A backlog of 128: the default 5 drops connections when many clients connect at once.
    server = type("ChatServer", (ThreadingHTTPServer,), {"request_queue_size": 128})
    return server((host, port), handler)
