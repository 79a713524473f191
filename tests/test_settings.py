"""Settings that are their own flags (scripts/common/settings.py): a field declared with flag() is a command-line
option of its name, and the parsed command line builds the dataclass back."""

from __future__ import annotations

import argparse
import ast
import math
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.errors import NanoLladaError, SettingError
from scripts.common.cli import flag_names, parse
from scripts.common.settings import add_flags, comma_list, flag, settings_from

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Example:
    steps: int | None = flag(None, "forward passes", "--gen-steps", kind=int)
    rate: float = flag(0.5, "a rate", low=0, high=1)
    mode: str = flag("a", "a choice", choices=["a", "b"])
    switch: bool = flag(False, "a switch")
    pair: bool | None = flag(None, "an on/off pair", kind=bool)
    sizes: list[int] | None = flag(None, "sizes", kind=comma_list(int))
    ratios: list[float] = flag([0.3, 0.7], "ratios")
    data: str = flag(None, "required", required=True)
    internal: int = 7  # not a flag


def parser(**defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Example, **defaults)
    return p


def test_each_flag_field_is_an_option_of_its_name_and_builds_the_dataclass_back():
    args = parse(parser(), ["--data", "x", "--gen-steps", "3", "--rate", "0.25", "--mode", "b", "--switch"])
    settings = settings_from(Example, args)
    assert settings == Example(steps=3, rate=0.25, mode="b", switch=True, data="x")
    args = parse(parser(), ["--data", "x", "--steps", "4", "--no-pair", "--sizes", "1,4,16", "--ratios", "0.5,0.5"])
    settings = settings_from(Example, args, internal=9)
    assert (settings.steps, settings.pair, settings.sizes, settings.ratios, settings.internal) == (
        4,
        False,
        [1, 4, 16],
        [0.5, 0.5],
        9,
    )
    assert not hasattr(args, "internal")  # a plain field is no flag


def test_an_entry_points_defaults_replace_the_fields_and_unknown_names_are_refused():
    assert settings_from(Example, parse(parser(rate=0.75), ["--data", "x"])).rate == 0.75
    with pytest.raises(ValueError, match="not flag fields"):
        parser(internal=1)


def test_ranges_choices_and_required_are_checked_while_parsing():
    with pytest.raises(NanoLladaError, match=r"^--rate must be in \[0, 1\], got 2.0"):
        parse(parser(), ["--data", "x", "--rate", "2"])
    with pytest.raises(NanoLladaError, match="--rate must be a finite number"):
        parse(parser(), ["--data", "x", "--rate", "nan"])
    for argv in (["--data", "x", "--mode", "c"], [], ["--data", "x", "--sizes", "1,a"]):
        with pytest.raises(SystemExit):
            parse(parser(), argv)


def test_a_prefix_keeps_two_classes_with_a_field_of_the_same_name_apart():
    p = argparse.ArgumentParser()
    add_flags(p, Example)
    add_flags(p, Example, prefix="other_", data="y")
    args = parse(p, ["--data", "x", "--rate", "0.1", "--other-rate", "0.9", "--other-steps", "2"])
    mine, other = settings_from(Example, args), settings_from(Example, args, "other_")
    assert (mine.rate, other.rate, other.steps, other.data) == (0.1, 0.9, 2, "y")
    with pytest.raises(SystemExit):  # a prefixed field does not take the other's aliases
        parse(p, ["--data", "x", "--other-gen-steps", "2"])


def test_the_librarys_messages_name_the_flag_of_the_field():
    parse(parser(), ["--data", "x"])
    with pytest.raises(NanoLladaError, match="^--steps 0 is too few$"), flag_names():
        raise SettingError("{steps} 0 is too few")
    with pytest.raises(NanoLladaError, match="^max_tokens 0"), flag_names({"gen_length": "max_tokens"}):
        raise SettingError("{gen_length} 0 is too few")
    assert math.isfinite(Example().rate)


def functions_reading_a_namespace(path: Path) -> list[str]:
    """Functions of `path` with a parameter named args or annotated argparse.Namespace."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "args" or "Namespace" in annotation:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


# The door: what turns a parsed command line into typed settings.
DOOR = {"from_args", "settings_from", "dpo_settings"}


def test_nothing_below_the_entry_points_reads_the_argparse_namespace():
    below = [p for p in sorted((ROOT / "scripts" / "common").rglob("*.py"))] + sorted((ROOT / "model").rglob("*.py"))
    readers = [f for path in below for f in functions_reading_a_namespace(path) if f.split()[-1] not in DOOR]
    assert not readers, readers


def test_a_prefixed_class_keeps_the_plain_spellings_that_are_free():
    """compare's choice flags: --choice-mc-samples beside the LM's --mc-samples, and the spellings it always took
    (--continuation, --chat, --max-forward-tokens); its choice scoring is seeded by the one --seed."""
    from scripts.common.evaluation.multiple_choice import ScoringSettings
    from scripts.eval import compare

    argv = ["--checkpoint", "a.pt", "--out", "o", "--data", "q.csv", "--mc-samples", "3", "--choice-mc-samples", "5"]
    args = compare.parse_args(
        [*argv, "--continuation", "option", "--chat", "--max-forward-tokens", "64", "--seed", "7"]
    )
    scoring = settings_from(ScoringSettings, args, "choice_", seed=args.seed)
    assert scoring == ScoringSettings("option", True, 5, 64, 7) and args.mc_samples == 3
    with pytest.raises(SystemExit):
        compare.parse_args([*argv, "--choice-seed", "1"])
