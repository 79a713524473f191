"""Running entry points in sequence, as the quickstart and the report's experiments do."""

from __future__ import annotations

import importlib
import shlex
import time

from model.config import preset

# The quickstart's and the CPU experiments' model (the "small" preset, 1.6M parameters), as shape flags.
SMALL_MODEL = {
    name: getattr(preset("small"), name)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
}


def cli(*switches: str, **options) -> list[str]:
    """Command-line arguments from keyword options: cli("--train", seq_len=128) -> ["--train", "--seq-len", "128"].
    Options set to None are left out."""
    argv = list(switches)
    for name, value in options.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def step(title: str, module: str, argv: list[str]):
    """Run one entry point in this process (imports are paid once), after printing its command line."""
    print(f"\n## {title}\n$ uv run python -m {module} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    result = importlib.import_module(module).main(argv)
    print(f"({time.perf_counter() - start:.0f} s)")
    return result
