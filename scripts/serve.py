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
from pathlib import Path

from model.errors import NanoLladaError
from model.inference.ar import ARSamplerConfig
from scripts.common.cli import Bounded, flag_names, parse, pick_device, positive, run_main
from scripts.common.evaluation.loading import add_checkpoint_flags, load_checkpoint_for_eval
from scripts.common.serving.engine import ChatEngine, Defaults
from scripts.common.serving.http import make_server


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(p, "AR or diffusion checkpoint (.pt), an HF export directory, or a MiniMind2 .pth")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    p.add_argument("--port", type=int, action=Bounded, low=0, high=65535, default=8998, help="0 picks a free port")
    p.add_argument(
        "--model-name", default=None, help="model id reported by /v1/models (default: the checkpoint's file name)"
    )
    p.add_argument("--device", default=None)
    p.add_argument(
        "--max-tokens",
        type=int,
        action=Bounded,
        low=1,
        default=256,
        help="completion length when a request gives no max_tokens",
    )
    p.add_argument(
        "--temperature",
        type=float,
        action=Bounded,
        low=0,
        default=None,
        help="default: 0.8 for AR, 0 (greedy) for diffusion",
    )
    p.add_argument("--top-k", type=int, action=Bounded, low=0, default=20, help="AR default top-k (0 = off)")
    p.add_argument(
        "--top-p",
        type=float,
        action=Bounded,
        low=0,
        high=1,
        above_low=True,
        default=1.0,
        help="AR default nucleus mass",
    )
    diffusion = p.add_argument_group("diffusion defaults (a request's steps, block_length, threshold override them)")
    steps_help = "forward passes over all blocks (default: one per token)"
    diffusion.add_argument("--gen-steps", "--steps", dest="steps", type=int, default=None, help=steps_help)
    diffusion.add_argument("--block-length", dest="block_size", type=int, default=32, help="block size; 0 = one block")
    diffusion.add_argument("--threshold", type=float, default=None, help="commit every token at least this confident")
    seq_help = "canvas limit, prompt + generation (default: max_position_embeddings)"
    diffusion.add_argument("--seq-len", type=int, default=None, help=seq_help)
    p.add_argument(
        "--max-batch", type=int, action=Bounded, low=1, default=16, help="most requests decoded together in one batch"
    )
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    return parse(p, argv)


def load_engine(args) -> ChatEngine:
    model, tokenizer, checkpoint = load_checkpoint_for_eval(
        args.checkpoint, args.tokenizer_dir, None, pick_device(args.device), args.num_attention_heads
    )
    defaults = Defaults(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        steps=args.steps,
        block_size=args.block_size or None,
        threshold=args.threshold,
        seq_len=args.seq_len,
    )
    name = args.model_name or Path(args.checkpoint).name.removesuffix(".pt").removesuffix(".pth")
    engine = ChatEngine(model, tokenizer, checkpoint, name, defaults, args.max_batch)
    temperature = 0.0 if args.temperature is None else args.temperature
    with flag_names({"gen_length": "--max-tokens", "max_new_tokens": "--max-tokens"}):  # as requests are checked
        ARSamplerConfig(temperature, args.top_k, args.top_p).check_arguments(args.max_tokens)
        if engine.kind == "diffusion":  # what a request with the default settings decodes with
            sampler = engine.sampler_for(args.max_tokens, args.steps, defaults.block_size, temperature, args.threshold)
            sampler.check_arguments()
    if engine.kind == "diffusion" and sampler.block_causal:
        print(
            f"block-trained diffusion checkpoint: decoding block-causally with block size {sampler.block_size} "
            "(block_length does not apply)"
        )
    return engine


def main(argv=None) -> None:
    args = parse_args(argv)
    positive("--max-batch", args.max_batch)
    positive("--block-length", args.block_size, allow_zero=True)
    engine = load_engine(args)
    try:
        server = make_server(engine, args.host, args.port, quiet=args.quiet)
    except OSError as err:
        raise NanoLladaError(
            f"cannot listen on {args.host}:{args.port} ({err.strerror}); pick another --port"
        ) from None
    host, port = server.server_address[:2]
    print(
        f"serving {engine.kind} model '{engine.model_id}' on http://{host}:{port}/v1 "
        "(POST /v1/chat/completions, GET /v1/models)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    run_main(main)
