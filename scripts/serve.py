"""OpenAI-compatible chat server for an AR or a diffusion checkpoint (the kind is read from the checkpoint).

uv run python -m scripts.serve --checkpoint weights/sft_state_dict.pt --tokenizer-dir . [--host 127.0.0.1] [--port 8998]

  POST /v1/chat/completions   messages through the tokenizer's chat template; "stream": true sends SSE chunks
                              (AR: token by token; diffusion: each finished block). Extra request fields:
                              top_k, and for diffusion steps, block_length, threshold. Requests waiting
                              together are decoded as one batch (up to --max-batch); a client that
                              disconnects stops its generation. max_tokens beyond the context is a 400.
  GET  /v1/models             the one model served (its id is --model-name, default the checkpoint's file name)

from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="unused")
client.chat.completions.create(model="nano-llada", messages=[{"role": "user", "content": "你好"}])
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig
from scripts.common.cli import flag_names, parse, pick_device, run_main
from scripts.common.evaluation.loading import add_checkpoint_flags, load_checkpoint_for_eval
from scripts.common.serving.engine import REQUEST_FIELDS, ChatEngine, ChatRequest
from scripts.common.serving.http import make_server
from scripts.common.settings import add_flags, flag, settings_from


@dataclass
class ServeOptions:
    """What the command line asks for, read once from argv: the checkpoint flags, a flag per flag() field, and
    `defaults`, the request a request's fields override."""

    checkpoint: str
    tokenizer_dir: str
    num_attention_heads: int | None
    defaults: ChatRequest
    host: str = flag("127.0.0.1", "interface to bind (default: this machine only)")
    port: int = flag(8998, "0 picks a free port", low=0, high=65535)
    model_name: str | None = flag(None, "model id reported by /v1/models (default: the checkpoint's file name)")
    device: str | None = flag(None, "cuda, mps or cpu (default: the best this machine has)")
    max_batch: int = flag(16, "most requests decoded together", low=1)
    seq_len: int | None = flag(None, "diffusion canvas, prompt + generation (default: the model's positions)", kind=int)
    quiet: bool = flag(False, "do not log each request")
    as_ar: bool = flag(False, "serve a jointly trained diffusion checkpoint as its AR model")


def parse_args(argv=None) -> ServeOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "AR or diffusion checkpoint (.pt), an HF export directory, or a MiniMind2 .pth")
    add_flags(p, ServeOptions)
    add_flags(p.add_argument_group("defaults of the request fields of the same names"), ChatRequest)
    args = parse(p, argv)
    return settings_from(ServeOptions, args, defaults=settings_from(ChatRequest, args))


def load_engine(o: ServeOptions) -> ChatEngine:
    """The checkpoint loaded behind a ChatEngine, its defaults checked as a request's fields are."""
    model, tokenizer, checkpoint = load_checkpoint_for_eval(
        o.checkpoint, o.tokenizer_dir, "ar" if o.as_ar else None, pick_device(o.device), o.num_attention_heads
    )
    name = o.model_name or Path(o.checkpoint).name.removesuffix(".pt").removesuffix(".pth")
    engine = ChatEngine(model, tokenizer, checkpoint, name, o.defaults, o.max_batch, o.seq_len)
    d = engine.defaults  # its temperature set for the model's kind
    renamed = {name: "--" + field.replace("_", "-") for name, field in REQUEST_FIELDS.items()}
    with flag_names(renamed):  # the defaults are checked as a request's fields are
        ARSamplerConfig(d.temperature, d.top_k, d.top_p).check_arguments(d.max_tokens)
        if engine.kind == "diffusion":  # what a request with the default settings decodes with
            sampler = engine.sampler_for(d)
            if sampler.block_causal:
                print(f"block-trained checkpoint: decoding block-causally with block size {sampler.block_size}")
    return engine


def main(argv=None) -> None:
    options = parse_args(argv)
    engine = load_engine(options)
    try:
        server = make_server(engine, options.host, options.port, quiet=options.quiet)
    except OSError as err:
        where = f"{options.host}:{options.port}"
        raise NanoLladaError(f"cannot listen on {where} ({err.strerror}); pick another --port") from None
    host, port = server.server_address[:2]
    print(f"serving {engine.kind} model '{engine.model_id}' on http://{host}:{port}/v1 "
          "(POST /v1/chat/completions, GET /v1/models)", flush=True)  # fmt: skip
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    run_main(main)
