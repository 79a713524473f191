"""A live OpenAI-compatible server on an ephemeral 127.0.0.1 port, for an AR and a diffusion checkpoint, queried with
the official openai client (stream and non-stream) and with raw HTTP for the error cases."""

import http.client
import json
import socket
import struct
import threading
import time

import pytest
import torch
from conftest import lively_model

from model.checkpoint import save_checkpoint
from model.config import preset
from model.inference.ar import ARSamplerConfig, generate
from model.tokenizer import EOS_ID, chat_text, decode, encode, load_tokenizer, tokenizer_identity
from scripts import serve

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "你好，介绍一下你自己。"}]
CONTEXT = 128


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(".")


def start_server(tmp_path_factory, tokenizer, kind):
    config = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=CONTEXT)
    torch.manual_seed(0)
    model = lively_model(config)
    path = tmp_path_factory.mktemp(kind) / f"{kind}.pt"
    save_checkpoint(path, kind, config, model, tokenizer_identity(tokenizer))
    args = serve.parse_args(
        [
            "--checkpoint",
            str(path),
            "--port",
            "0",
            "--quiet",
            "--model-name",
            f"tiny-{kind}",
            "--block-length",
            "4",
            "--max-tokens",
            "16",
        ]
    )
    engine = serve.load_engine(args)
    server = serve.make_server(engine, args.host, args.port, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    return server, thread, port, engine


@pytest.fixture(scope="module", params=["ar", "diffusion"])
def live(request, tmp_path_factory, tokenizer):
    server, thread, port, engine = start_server(tmp_path_factory, tokenizer, request.param)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield request.param, client, port, engine
    server.shutdown()
    server.server_close()
    engine.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_models_and_chat(live, tokenizer):
    kind, client, _, engine = live
    model = engine.model
    assert [m.id for m in client.models.list().data] == [f"tiny-{kind}"]
    extra = {"block_length": 4, "steps": 12} if kind == "diffusion" else {}
    reply = client.chat.completions.create(
        model=f"tiny-{kind}", messages=MESSAGES, max_tokens=12, temperature=0, extra_body=extra
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    prompt = encode(tokenizer, chat_text(tokenizer, MESSAGES, add_generation_prompt=True))
    assert reply.usage.prompt_tokens == len(prompt)
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens
    if kind == "ar":  # greedy: exactly what model.inference.ar.generate produces
        ours = list(generate(model, prompt, 12, ARSamplerConfig(banned_ids=(6400,)), eos_id=EOS_ID))
        assert choice.message.content == decode(tokenizer, [t for t in ours if t != EOS_ID])
        assert reply.usage.completion_tokens == len(ours)

    chunks = list(
        client.chat.completions.create(
            model=f"tiny-{kind}",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == choice.message.content  # greedy: the stream spells the same answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # streamed in pieces: AR token by token, diffusion one delta per finished block of 4 (at most 12 / 4 of them)
    assert 1 < len(deltas) <= (3 if kind == "diffusion" else 12)


def raw(port, method, path, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read() or b"null")
    connection.close()
    return response.status, payload


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        ([1, 2], None),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "max_tokens": "12"}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": CONTEXT}, "max_tokens"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "temperature": float("nan")}, "temperature"),  # json.dumps writes NaN
        ({"messages": MESSAGES, "temperature": -1}, "temperature"),
        ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 10**400}, "max_tokens"),
        ({"messages": MESSAGES, "temperature": 1e300}, "temperature"),  # past float32: a 500 before
        ({"messages": MESSAGES, "stream_options": {"include_usage": "yes"}}, "include_usage"),
        ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(live, body, param):
    _, client, port, _ = live
    status, payload = raw(port, "POST", "/v1/chat/completions", body)
    assert status == 400, payload
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]
    assert payload["error"]["param"] == param
    status, payload = raw(
        port, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    )
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"


def test_text_parts_max_completion_tokens_and_the_model_card(live):
    kind, _, port, _ = live
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES]
    as_parts = {"messages": parts, "max_completion_tokens": 5, "temperature": 0, "unknown_field": [1]}
    status, payload = raw(port, "POST", "/v1/chat/completions", as_parts)
    status_plain, plain = raw(
        port, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    )
    assert status == status_plain == 200 and payload["choices"][0]["message"] == plain["choices"][0]["message"]
    assert payload["usage"] == plain["usage"] and payload["usage"]["completion_tokens"] <= 5
    assert raw(port, "GET", f"/v1/models/tiny-{kind}") == (200, raw(port, "GET", "/v1/models")[1]["data"][0])
    assert raw(port, "GET", "/v1/models/other")[0] == 404


def test_other_errors(live):
    kind, client, port, _ = live
    assert raw(port, "GET", "/v1/nothing")[0] == 404
    assert raw(port, "POST", "/v1/completions", {"prompt": "hi"})[0] == 404
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=10_000)
    if kind == "diffusion":
        status, payload = raw(
            port, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "block_length": 4, "steps": 1}
        )
        assert status == 400 and payload["error"]["param"] == "steps"
    assert client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=2).choices[0].finish_reason in (
        "stop",
        "length",
    )


def test_diffusion_steps_are_bounded_and_a_client_that_leaves_early_is_silent(live, capsys):
    kind, _, port, _ = live
    if kind == "diffusion":  # 1e9 steps stalled the worker at 16.8 GB while other clients waited
        body = {"messages": MESSAGES, "max_tokens": 8, "steps": 10**9}
        status, payload = raw(port, "POST", "/v1/chat/completions", body)
        assert status == 400 and payload["error"]["param"] == "steps" and "[1, 8]" in payload["error"]["message"]
    capsys.readouterr()
    for reset in (False, True):  # a close, then a reset, before the announced body has come
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b'POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 100\r\n\r\n{"mes')
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    time.sleep(0.3)  # the server reads the cut-short requests on its own threads
    status, _ = raw(port, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and capsys.readouterr().err == ""  # two tracebacks per connection before


def settle(engine, timeout=10.0):
    """Wait until the generation worker has nothing queued and no batch in progress."""
    deadline = time.monotonic() + timeout
    while engine.worker.pending or engine.worker.lock.locked():
        assert time.monotonic() < deadline, "the generation worker is still busy"
        time.sleep(0.002)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation_within_one_step(live, stream):
    kind, _, port, engine = live
    forwards = []

    def slow(_module, _args, _output):  # every forward pass takes 10 ms more: a generation worth cutting short
        forwards.append(time.monotonic())
        time.sleep(0.01)

    body = {"messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": stream}
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    hook = engine.model.register_forward_hook(slow)
    try:
        assert raw(port, "POST", "/v1/chat/completions", {**body, "stream": False})[0] == 200
        full = len(forwards)
        assert full >= 48  # the whole answer takes this many forward passes
        forwards.clear()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(head.encode() + data)
            while len(forwards) < 4:  # the generation is under way; then the client gives up
                time.sleep(0.001)
        left_at = len(forwards)
        settle(engine)
        # the forward pass in flight when the client left may finish; none starts after it
        assert len(forwards) - left_at <= 2, (left_at, len(forwards), full)
    finally:
        hook.remove()
    status, payload = raw(port, "POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2})
    assert status == 200 and payload["usage"]["completion_tokens"] <= 2


def test_requests_waiting_together_are_decoded_as_one_batch_with_their_own_answers(live):
    kind, _, port, engine = live
    questions = ["你好", "今天天气怎么样？", "介绍一下北京的历史。", "1+1等于几？"]
    bodies = [
        {
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": 12 if kind == "diffusion" else 6 + 3 * i,  # diffusion batches equal settings only
        }
        for i, question in enumerate(questions)
    ]
    alone = [raw(port, "POST", "/v1/chat/completions", body)[1] for body in bodies]
    together = [None] * len(bodies)

    def ask(i):
        together[i] = raw(port, "POST", "/v1/chat/completions", bodies[i])[1]

    before = len(engine.worker.batch_sizes)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    with engine.worker.lock:  # the worker waits until every request has arrived
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(engine.worker.pending) < len(bodies):
            assert time.monotonic() < deadline
            time.sleep(0.002)
    for thread in threads:
        thread.join(timeout=30)
    assert engine.worker.batch_sizes[before:] == [len(bodies)]
    for one, batched in zip(alone, together):
        assert batched["choices"][0]["message"] == one["choices"][0]["message"]
        assert batched["choices"][0]["finish_reason"] == one["choices"][0]["finish_reason"]
        assert batched["usage"] == one["usage"]
    assert len({one["choices"][0]["message"]["content"] for one in alone}) > 1  # the answers differ


def test_the_load_script_measures_a_live_server(live):
    from scripts.bench_server import load

    _, _, port, engine = live
    result = load(port, clients=2, requests=4, max_tokens=3)
    assert result["n"] == 4 and result["rps"] > 0 and 0 < result["p50"] <= result["p95"]
