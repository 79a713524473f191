"""Settings that are their own command-line flags. A dataclass field declared with `flag(default, help)` is the flag
--field-name (plus any older spellings as aliases), with that default, help and range; `add_flags` puts a class's
fields on a parser and `settings_from` builds the class from the parsed command line. So a new option is one field
and one help string; the library's messages name fields, which scripts.common.cli.flag_names words as the flags of
the command line parsed last."""

from __future__ import annotations

import argparse
import dataclasses
import math

from scripts.common.cli import Bounded

_MISSING = dataclasses.MISSING


def flag(
    default,
    help: str,
    *aliases: str,
    low: float = -math.inf,
    high: float = math.inf,
    above_low: bool = False,
    choices=None,
    kind=None,
    metavar: str | None = None,
    required: bool = False,
):
    """A dataclass field that is the flag --<field-name> (and `aliases`, the spellings the seed commands use); `low`,
    `high`, `above_low`: its range, checked while the command line is parsed; `kind`: its type where the default
    is None (a bool kind makes an on/off pair); lists take a comma-separated value; `required`: no default."""
    meta = dict(help=help, aliases=aliases, low=low, high=high, above_low=above_low, choices=choices, kind=kind)
    meta.update(metavar=metavar, required=required)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"flag": meta})
    return dataclasses.field(default=default, metadata={"flag": meta})


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def add_flags(parser, cls, prefix: str = "", skip: tuple[str, ...] = (), **defaults) -> None:
    """One flag per `flag` field of `cls` but those in `skip` (set by the entry point); `defaults` replace some
    fields' defaults (an entry point's own); `prefix` goes before each flag and field name where two classes on one
    command line have a field of the same name, and the plain spellings stay as aliases where they are free."""
    unknown = (set(defaults) | set(skip)) - {f.name for f in flag_fields(cls)}
    if unknown:
        raise ValueError(f"not flag fields of {cls.__name__}: {sorted(unknown)}")
    for f in (f for f in flag_fields(cls) if f.name not in skip):
        meta = f.metadata["flag"]
        default = defaults.get(f.name, f.default if f.default is not _MISSING else f.default_factory())
        plain = [f"--{f.name.replace('_', '-')}", *meta["aliases"]]
        taken = parser._option_string_actions  # (argparse keeps no public list of the options a parser has)
        names = [f"--{(prefix + f.name).replace('_', '-')}", *(n for n in plain if n not in taken)] if prefix else plain
        options = dict(dest=prefix + f.name, default=default, help=meta["help"], metavar=meta["metavar"])
        if meta["required"] and f.name not in defaults:  # an entry point's default makes it optional
            options["required"] = True
        kind = meta["kind"] or (str if default is None else type(default))
        if kind is bool:  # a switch, or an on/off pair where the field says its kind (off can then be asked for)
            action = "store_true" if meta["kind"] is None else argparse.BooleanOptionalAction
            parser.add_argument(*names, action=action, **{k: v for k, v in options.items() if k != "metavar"})
            continue
        if isinstance(default, list):
            kind = comma_list(type(default[0]) if default else int)
        bounded = meta["low"] > -math.inf or meta["high"] < math.inf
        if bounded:
            options.update(action=Bounded, low=meta["low"], high=meta["high"], above_low=meta["above_low"])
        parser.add_argument(*names, type=kind, choices=meta["choices"], **options)


def comma_list(kind):
    """The type of a flag that takes a comma-separated list of `kind` ("1,4,16")."""

    def parse_list(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got '{text}'") from None

    parse_list.__name__ = f"list of {kind.__name__}"
    return parse_list


def settings_from(cls, args: argparse.Namespace, prefix: str = "", **values):
    """`cls` built from the parsed command line: each field from the flag of its name (after `prefix`), `values` for
    the rest."""
    names = {f.name for f in dataclasses.fields(cls)} - set(values)
    given = {name: getattr(args, prefix + name) for name in names if hasattr(args, prefix + name)}
    return cls(**given, **values)
