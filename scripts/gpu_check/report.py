"""What every stage of the GPU check shares: the report (greppable PASS / FAIL / SKIP lines and a JSON file rewritten
after every line, so a killed run leaves what it measured), the stage context and the stage time limits."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scripts.common.device import timed

STATUSES = ("PASS", "FAIL", "SKIP")


class StageTimeout(BaseException):
    """Raised in the main thread when a stage runs past its limit. A BaseException, so no `except Exception` on the
    way (the compile fallback, for one) mistakes it for a failure and retries."""


@dataclass
class Report:
    path: Path
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.record.setdefault("checks", [])
        self.record.setdefault("stages", {})
        self.record["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def check(self, status: str, stage: str, name: str, detail: str = "", **data) -> None:
        """One result line, `STATUS stage.name: detail`, printed and saved at once."""
        assert status in STATUSES, status
        print(f"{status} {stage}.{name}: {detail}".rstrip(": "), flush=True)
        self.record["checks"].append({"status": status, "stage": stage, "name": name, "detail": detail, **data})
        self.save()

    def stage_result(self, stage: str, **values) -> None:
        self.record["stages"].setdefault(stage, {}).update(values)
        self.save()

    def counts(self) -> dict:
        return {s: sum(c["status"] == s for c in self.record["checks"]) for s in STATUSES}

    def save(self) -> None:
        self.record["summary"] = self.counts()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self.record, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)  # a reader never sees half a file


@dataclass
class Context:
    """What a stage gets: where to write, the device, the flags, the report and its own deadline."""

    out: Path
    device: torch.device
    args: object
    report: Report
    work: Path | None = None  # the runs' corpus and checkpoints (large: kept out of `out`)
    stage: str = ""
    deadline: float = 0.0
    shared: dict = field(default_factory=dict)  # results later stages use (e.g. the trained checkpoints)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, status: str, name: str, detail: str = "", **data) -> None:
        self.report.check(status, self.stage, name, detail, **data)

    def verdict(self, name: str, ok: bool, detail: str, **data) -> None:
        self.check("PASS" if ok else "FAIL", name, detail, **data)

    def guarded(self, name: str, fn: Callable, seconds_needed: float = 0.0):
        """fn() as one named check: SKIP when the stage has less than seconds_needed left, FAIL with the error's
        first line (the traceback goes to DIR/errors.log) when it raises. Returns fn()'s value or None."""
        if self.left() < seconds_needed:
            self.check("SKIP", name, f"{self.left():.0f} s left in the stage, {seconds_needed:.0f} s needed")
            return None
        try:
            return fn()
        except Exception as err:  # one failed item must not end the stage
            self.check("FAIL", name, one_line(err))
            with open(self.out / "errors.log", "a", encoding="utf-8") as log:
                log.write(f"--- {self.stage}.{name}\n{traceback.format_exc()}\n")
            return None


def one_line(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:200]}"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in the main thread after `seconds` (SIGALRM; a no-op where signals are unavailable)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise StageTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_ms(fn: Callable, device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `repeats` calls after `warmup` ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(1e3 * timed(fn, device)[1] for _ in range(repeats))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
