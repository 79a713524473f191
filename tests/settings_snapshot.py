"""What every seed command and each trainer's bare defaults parse to, as JSON: run it before and after a change to
the command line and compare the two files (a refactor of the flags must leave them equal).

    uv run python tests/settings_snapshot.py > before.json   # ... change the code ...
    uv run python tests/settings_snapshot.py > after.json && diff before.json after.json

Each entry point's `settings(argv)` (the typed settings its main builds from the command line, flattened to
name -> value) is recorded; an entry point without one records its parsed Namespace.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repository root is the package root

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
TRAINERS = [
    "scripts.train.train_pretrain",
    "scripts.train.diffusion",
    "scripts.train.train_sft_minimind",
    "scripts.train.train_sft_diffusion",
    "scripts.train.train_dpo_minimind",
    "scripts.train.train_dpo_diffusion",
]
# The least each trainer takes (diffusion refuses to run without --train; SFT and DPO need their data).
BARE = {
    "scripts.train.diffusion": ["--train"],
    "scripts.train.train_sft_minimind": ["--data", "sft.jsonl"],
    "scripts.train.train_sft_diffusion": ["--data", "sft.jsonl"],
    "scripts.train.train_dpo_minimind": ["--data", "dpo.jsonl", "--load-from", "sft.pt"],
    "scripts.train.train_dpo_diffusion": ["--data", "dpo.jsonl", "--load-from", "sft.pt"],
}


def seed_commands() -> list[tuple[str, list[str]]]:
    """(module, argv) of every `uv run python -m scripts...` command in the seed files 000 and 001 (002 is the
    English copy of 001, with its commands run into its prose)."""
    commands = []
    for path in sorted(SEEDS.glob("00[01]_*.txt")):
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("uv run python -m ")[1:]:
                words = shlex.split(part.split("```")[0])
                if words and words[0].startswith("scripts."):
                    commands.append((words[0], words[1:]))
    return commands


def flattened(value) -> dict:
    """name -> value of a Namespace or a dataclass, nested dataclasses and dicts of settings opened up (the shape
    flags' `given`, which flags were typed, is left out: the Namespace spells it model_flags_given)."""
    items = (
        vars(value)
        if not dataclasses.is_dataclass(value)
        else {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    )
    merged = {}
    for name, item in items.items():
        if dataclasses.is_dataclass(item) or (isinstance(item, dict) and name == "values"):
            nested = flattened(item) if dataclasses.is_dataclass(item) else item
            merged.update({k: v for k, v in nested.items() if k not in merged})
        elif name not in ("given", "model_flags_given") and name not in merged:  # the first of a name wins
            merged[name] = item
    return merged


def snapshot(module_name: str, argv: list[str]) -> dict:
    module = importlib.import_module(module_name)
    parsed = module.settings(argv) if hasattr(module, "settings") else module.parse_args(argv)
    return {
        k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in flattened(parsed).items()
    }


def main() -> None:
    cases = [(m, argv) for m, argv in seed_commands()] + [(m, BARE.get(m, [])) for m in TRAINERS]
    out = {f"{m} {shlex.join(argv)}": snapshot(m, argv) for m, argv in cases}
    json.dump(out, sys.stdout, indent=1, sort_keys=True, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
