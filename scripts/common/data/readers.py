"""Readers for the three data formats: MiniMind pretraining jsonl, plain .txt, SFT jsonl; and the jsonl writer.

Everything streams line by line (or seeks by byte offset), so a 1.6 GB file is never held in memory.
Every problem is reported as `file:line: what is wrong; how to fix it`.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from model.errors import NanoLladaError

HOW_TO_GET_DATA = (
    "build the offline sample with `uv run python -m scripts.data.sample` "
    "or download the real data with `uv run python -m scripts.data.download`"
)


def check_data_file(path: str | os.PathLike, fix: str = HOW_TO_GET_DATA) -> Path:
    """Fail with one actionable line if `path` is missing, a directory or empty (`fix`: how to get such a file)."""
    p = Path(path)
    if not p.exists():
        raise NanoLladaError(f"{p}: data file not found; {fix}")
    if p.is_dir():
        raise NanoLladaError(f"{p}: is a directory, expected a .jsonl or .txt file")
    if p.stat().st_size == 0:
        raise NanoLladaError(f"{p}: data file is empty; {fix}")
    if p.suffix not in (".jsonl", ".json", ".txt"):
        raise NanoLladaError(
            f"{p}: unsupported data format '{p.suffix}'; "
            "use .jsonl (one JSON object per line) or .txt (one document per line)"
        )
    return p


class BadLine(NanoLladaError):
    """One line of a data file is unusable. The message names the line and its fix; an entry point with a
    --skip-bad-lines flag adds that the flag skips such lines (the others have no such flag to suggest)."""


def _parse_json_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadLine(f"{path}:{lineno}: malformed JSON ({err.__class__.__name__}: {err}); fix the line") from None
    if not isinstance(obj, dict):
        raise BadLine(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; fix the line")
    return obj


class BadLineCounter:
    """Counts skipped lines so the caller can print one summary instead of silently dropping data."""

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def add(self, message: str) -> None:
        self.count += 1
        self.first = self.first or message

    def summary(self, path: Path) -> str | None:
        if not self.count:
            return None
        return f"{path}: skipped {self.count} bad line(s); first: {self.first}"


def skip_or_raise(err: NanoLladaError, skip_bad_lines: bool, bad: BadLineCounter | None) -> None:
    """A bad line stops the read, or with skip_bad_lines is counted in `bad` (if given) and skipped."""
    if not skip_bad_lines:
        raise err from None
    if bad is not None:
        bad.add(str(err))


def iter_jsonl(
    path: str | os.PathLike, skip_bad_lines: bool = False, bad: BadLineCounter | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a jsonl file."""
    path = check_data_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, _parse_json_line(path, lineno, raw)
            except NanoLladaError as err:
                skip_or_raise(err, skip_bad_lines, bad)


def text_of(path: Path, lineno: int, obj: dict, field: str) -> str:
    """The text field of a pretraining row, or a clear error naming the line and the fields it does have."""
    if field not in obj:
        raise BadLine(
            f"{path}:{lineno}: no field '{field}' (this line has: {', '.join(sorted(obj)) or 'nothing'}); "
            "pass --jsonl-field NAME"
        )
    value = obj[field]
    if not isinstance(value, str):
        raise BadLine(f"{path}:{lineno}: field '{field}' is {type(value).__name__}, expected a string")
    return value


def iter_texts(
    path: str | os.PathLike, field: str = "text", skip_bad_lines: bool = False, bad: BadLineCounter | None = None
) -> Iterator[str]:
    """Yield the documents of a pretraining file: jsonl `{field: text}` rows or .txt lines (blank lines skipped)."""
    path = check_data_file(path)
    if path.suffix == ".txt":
        yield from _iter_text_lines(path, skip_bad_lines, bad)
        return
    for lineno, obj in iter_jsonl(path, skip_bad_lines, bad):
        try:
            text = text_of(path, lineno, obj, field)
        except NanoLladaError as err:
            skip_or_raise(err, skip_bad_lines, bad)
            continue
        if text.strip():
            yield text


def _iter_text_lines(path: Path, skip_bad_lines: bool, bad: BadLineCounter | None) -> Iterator[str]:
    """The non-blank lines of a .txt file. A UTF-8 BOM (some editors write one) is not text to train on, and a line
    that is not UTF-8 is refused (or skipped and counted) as in a jsonl file, never silently replaced."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.removeprefix(codecs.BOM_UTF8 if lineno == 1 else b"").decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                reason = f"not UTF-8 (byte {err.start}: {err.reason}); save the file as UTF-8"
                skip_or_raise(BadLine(f"{path}:{lineno}: {reason}"), skip_bad_lines, bad)
                continue
            if line.strip():
                yield line


SFT_ROLES = ("system", "user", "assistant")


def conversation_of(path: Path, lineno: int, obj: dict) -> list[dict]:
    """Validate one SFT row `{"conversations": [{"role", "content"}, ...]}` and return its turns."""
    turns = obj.get("conversations", obj.get("messages"))
    if turns is None:
        raise BadLine(
            f"{path}:{lineno}: no field 'conversations' (this line has: {', '.join(sorted(obj)) or 'nothing'})"
        )
    if not isinstance(turns, list) or not turns:
        raise BadLine(f"{path}:{lineno}: 'conversations' must be a non-empty list of {{role, content}}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise BadLine(f"{path}:{lineno}: turn {k} needs 'role' and 'content'")
        if turn["role"] not in SFT_ROLES:
            raise BadLine(
                f"{path}:{lineno}: turn {k} has unknown role '{turn['role']}' (expected one of {', '.join(SFT_ROLES)})"
            )
        if not isinstance(turn["content"], str):
            raise BadLine(
                f"{path}:{lineno}: turn {k} ({turn['role']}) has content of type {type(turn['content']).__name__}, "
                "expected a string"
            )
        if not turn["content"].strip():
            raise BadLine(f"{path}:{lineno}: turn {k} ({turn['role']}) has empty content")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise BadLine(f"{path}:{lineno}: no assistant turn, nothing to learn from")
    first = next(turn["role"] for turn in turns if turn["role"] != "system")
    if first != "user":
        raise BadLine(f"{path}:{lineno}: the conversation opens with an assistant turn; it has no prompt to answer")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def iter_conversations(
    path: str | os.PathLike, skip_bad_lines: bool = True, bad: BadLineCounter | None = None
) -> Iterator[list[dict]]:
    """Yield validated conversations; invalid rows are counted in `bad` (or raised if skip_bad_lines is False)."""
    path = check_data_file(path)
    for lineno, obj in iter_jsonl(path, skip_bad_lines, bad):
        try:
            yield conversation_of(path, lineno, obj)
        except NanoLladaError as err:
            skip_or_raise(err, skip_bad_lines, bad)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write atomically (temp file + os.replace) so an interrupted run never leaves half a file.

    An unchanged file is left untouched, so its tokenized caches (keyed by size and mtime) stay valid.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        os.replace(tmp, path)
