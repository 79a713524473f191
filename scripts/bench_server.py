"""Load test of the chat server (scripts.serve): requests/s and p50/p95 latency at several numbers of concurrent
clients, for the server of one or more source trees (e.g. this one and an older commit's `git worktree`).

uv run python -m scripts.bench_server --tree new=. --tree old=/tmp/old_server --clients 1 4 16

For each tree and each model kind it writes a random tiny checkpoint (the tiny preset, whose greedy answers never
stop early, so every request costs max_tokens tokens), starts that tree's server on a free 127.0.0.1 port with
OMP_NUM_THREADS=1, sends --requests greedy non-streaming requests at each concurrency level (each client sends its
next request when its last one is answered), prints a markdown table and stops the server. It stops by itself:
every request has a timeout and no level starts after --deadline seconds.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from model.checkpoint import save_checkpoint
from model.config import preset
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts.common.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, help="NAME=DIR: serve with DIR's scripts.serve")
    p.add_argument("--kinds", nargs="+", default=["ar", "diffusion"], choices=["ar", "diffusion"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tokenizer-dir", default=".")
    p.add_argument("--deadline", type=float, default=170.0, help="start no level after this many seconds")
    return p.parse_args(argv)


def start_server(tree: str, checkpoint: Path, tokenizer_dir: str) -> tuple[subprocess.Popen, int]:
    """The tree's server on a free port (read from its "serving ... on http://host:port/v1" line)."""
    command = [sys.executable, "-m", "scripts.serve", "--checkpoint", str(checkpoint), "--port", "0", "--quiet"]
    command += ["--tokenizer-dir", str(Path(tokenizer_dir).resolve()), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    for line in server.stdout:
        if line.startswith("serving"):
            return server, int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
    server.kill()
    raise RuntimeError(f"the server of {tree} did not start")


def ask(port: int, question: str, max_tokens: int) -> float:
    """Seconds one greedy request took to be answered (urllib raises on a status other than 200)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - start


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests from `clients` concurrent clients; requests/s and latency percentiles (nearest rank)."""

    def one(i: int) -> float | None:  # refused, reset or not 200: counted as failed, not timed
        try:
            return ask(port, f"第{i}个问题：今天天气怎么样？", max_tokens)
        except OSError:
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:  # a client sends its next request once its last one is answered
        seconds = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ordered = sorted(s for s in seconds if s is not None) or [math.nan]
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    answered = requests - seconds.count(None)
    return {"rps": answered / wall, "p50": statistics.median(ordered), "p95": p95, "n": answered,
            "failed": requests - answered}  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer_dir)
    print(f"{args.requests} requests per level, max_tokens {args.max_tokens}, greedy, non-streaming")
    print("| server | model | clients | requests/s | p50 latency (s) | p95 latency (s) | failed |\n" + "|---" * 7 + "|")
    with tempfile.TemporaryDirectory() as directory:
        for kind in args.kinds:
            torch.manual_seed(0)
            config = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=256)
            checkpoint = Path(directory) / f"{kind}.pt"
            save_checkpoint(checkpoint, kind, config, Transformer(config).eval(), tokenizer_identity(tokenizer))
            for name, tree in (tree.split("=", 1) for tree in args.tree):
                server, port = start_server(tree, checkpoint, args.tokenizer_dir)
                try:
                    ask(port, "hi", 2)  # warm-up
                    for clients in args.clients:
                        if time.perf_counter() - began > args.deadline:
                            print(f"| {name} | {kind} | {clients} | (skipped: past --deadline) | | | |")
                            continue
                        r = load(port, clients, args.requests, args.max_tokens)
                        print(f"| {name} | {kind} | {clients} | {r['rps']:.1f} | {r['p50']:.3f} | {r['p95']:.3f} "
                              f"| {r['failed']} |", flush=True)  # fmt: skip
                finally:
                    server.terminate()
                    server.wait(timeout=30)
    print(f"done in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    run_main(main)
