"""CLI plumbing shared by the entry points: clean one-line errors, model flags, device choice."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import NanoLladaError, SettingError, check_setting
from scripts.common import device as device_habits


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that says what the run left behind: run_main prints its text instead of a bare "interrupted"."""


def interrupted_before_training(resume: bool) -> Interrupted:
    """The Ctrl-C of a trainer before its first step (tokenizing, loading): no checkpoint of this start exists."""
    if resume:
        return Interrupted("interrupted before training resumed: the run's checkpoint is unchanged; rerun to continue")
    return Interrupted("interrupted before the first step: nothing was saved, so there is nothing to --resume")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where Ctrl-C would be, so a training run saves its last step."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_main(main_fn) -> None:
    """Run an entry point; a NanoLladaError or a file-system error becomes one line on stderr and exit status 2
    (no traceback); Ctrl-C exits 130 with one line, and SIGTERM is handled as Ctrl-C is (a training run saves its
    last finished step and says so) and exits 143. Under torchrun only rank 0 prints: the other ranks' stdout is
    discarded (their errors still reach stderr)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with contextlib.ExitStack() as stack:
            if int(os.environ.get("RANK", "0")) > 0:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            main_fn()
    except NanoLladaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk, a read-only or missing directory: the user's to fix, not a bug
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        terminated = isinstance(err, Terminated) or isinstance(err.__context__, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(str(err).replace("interrupted", what, 1) if isinstance(err, Interrupted) else what, file=sys.stderr)
        sys.exit(143 if terminated else 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


# field -> its flag (the first spelling: "--steps" of --steps/--gen-steps) on the command line parsed last. The
# library's messages name its fields; flag_names words them as the flags that set them.
_parsed_flags: dict[str, str] = {}
# Library fields set by a flag of another name: the sampler's generation length and the block curriculum's sizes.
_FLAG_OF_FIELD = {
    "gen_length": "max_new_tokens",
    "sizes_up": "wsd_block_sizes_up",
    "sizes_down": "wsd_block_sizes_down",
    "phase_ratios": "wsd_phase_ratios",
}


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args, remembering each field's flag for the messages run_main prints."""
    args = parser.parse_args(argv)
    _parsed_flags.clear()
    for action in parser._actions:
        if action.option_strings:
            _parsed_flags.setdefault(action.dest, action.option_strings[0])
    for field, dest in _FLAG_OF_FIELD.items():
        if dest in _parsed_flags:
            _parsed_flags[field] = _parsed_flags[dest]
    return args


@contextlib.contextmanager
def flag_names(renamed: dict[str, str] | None = None):
    """Word the library's complaints about its fields (SettingError) as complaints about the flags of the command
    line parsed last (`renamed`: names of some fields that are not flags, such as a server's request fields)."""
    try:
        yield
    except SettingError as err:
        raise NanoLladaError(err.worded({**_parsed_flags, **(renamed or {})})) from None


# ModelConfig fields with a flag of the same name (the seed commands' shape flags); defaults are ModelConfig's.
SHAPE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "dropout",
)
# The shape switches (off unless given) and their help.
SHAPE_SWITCHES = {
    "untie_word_embeddings": "separate output head (default: tied to the embedding, as MiniMind2)",
    "inference_rope_scaling": "YaRN RoPE scaling (factor 16 over 2048 positions), stored in the checkpoint",
}


class _ModelFlag(argparse.Action):
    """Stores a shape flag and notes that the user gave it: a resumed run refuses a given flag that differs from
    its checkpoint (the defaults say nothing, so they are never compared)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.model_flags_given = (*namespace.model_flags_given, self.dest)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Shape flags of the seed commands (defaults = MiniMind2-Small). A checkpoint's stored config wins over them;
    on --resume a given flag must agree with it (ModelFlags.refuse_changed)."""
    group = parser.add_argument_group("model shape (ignored when a checkpoint supplies the config)")
    parser.set_defaults(model_flags_given=())
    for name in SHAPE_FIELDS:
        default = ModelConfig.__dataclass_fields__[name].default
        group.add_argument(
            f"--{name.replace('_', '-')}",
            type=int if default is None else type(default),
            default=default,
            action=_ModelFlag,
        )
    for name, help_text in SHAPE_SWITCHES.items():
        group.add_argument(
            f"--{name.replace('_', '-')}", action=_ModelFlag, nargs=0, const=True, default=False, help=help_text
        )


@dataclass
class ModelFlags:
    """The shape flags as parsed (`values`: field -> value) and which of them the user gave (`given`)."""

    values: dict
    given: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelFlags:
        values = {name: getattr(args, name) for name in (*SHAPE_FIELDS, *SHAPE_SWITCHES)}
        return cls(values, tuple(dict.fromkeys(args.model_flags_given)))

    def model_config(self, vocab_size: int) -> ModelConfig:
        v = self.values
        positive("--rope-theta", v["rope_theta"])
        positive("--rms-norm-eps", v["rms_norm_eps"])
        if not 0 <= v["dropout"] < 1:
            raise NanoLladaError(f"--dropout must lie in [0, 1), got {v['dropout']}")
        return ModelConfig(
            **{name: v[name] for name in SHAPE_FIELDS},
            vocab_size=vocab_size,
            tie_word_embeddings=not v["untie_word_embeddings"],
            inference_rope_scaling=v["inference_rope_scaling"],
        )

    def refuse_changed(self, config: ModelConfig, path) -> None:
        """A resumed run trains its checkpoint's model, so a shape flag given with another value would be ignored
        without a word: refuse it, naming the flag, the checkpoint's value and the fix."""
        stored = {name: (name, getattr(config, name)) for name in (*SHAPE_FIELDS, "inference_rope_scaling")}
        stored["untie_word_embeddings"] = ("tie_word_embeddings", config.tie_word_embeddings)
        changed = []
        for name in self.given:
            field, value = stored[name]
            given = self.values[name]
            if given != (not value if name == "untie_word_embeddings" else value):
                flag = f"--{name.replace('_', '-')}" + ("" if isinstance(given, bool) else f" {given}")
                changed.append(f"{flag} (checkpoint: {field}={value})")
        if changed:
            which = "that flag" if len(changed) == 1 else "those flags"
            raise NanoLladaError(
                f"--resume: {path} keeps its model shape, so {'; '.join(changed)} cannot apply; "
                f"drop {which} to resume it, or start a new --run-name"
            )


def pick_device(name: str | None = None) -> torch.device:
    """--device NAME, refused in one line unless this machine has it; without a name: CUDA, MPS or the CPU, but never
    the CPU on a machine whose NVIDIA GPU torch cannot use (a run there would be silently slow): that is refused,
    naming the driver / toolkit mismatch and the fix."""
    if name:
        return _named_device(name)
    reason = device_habits.unusable_gpu_reason()
    if reason:
        raise NanoLladaError(reason)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _named_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise NanoLladaError(f"--device {name}: not a device nano-llada runs on; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NanoLladaError(f"--device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise NanoLladaError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise NanoLladaError(f"--device {name} requested but MPS (Apple silicon) is not available; use --device cpu")
    return device


def writable_dir(path, flag: str) -> Path:
    """Create `path` if needed and prove it takes a file, so a run fails at its start, in one line, rather than
    at its first checkpoint."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NanoLladaError(f"{flag} {path}: is a file, not a directory; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise NanoLladaError(f"{flag} {path}: cannot write there ({err.strerror}); choose another {flag}") from None
    return path


class Bounded(argparse.Action):
    """A numeric flag whose range is written where the flag is defined and checked while the command line is parsed,
    before any file is read: add_argument("--mc-samples", type=int, action=Bounded, low=1). The message names the
    flag as the user typed it (an alias included); defaults are not checked (they are in range by construction)."""

    def __init__(self, *args, low: float = -math.inf, high: float = math.inf, above_low: bool = False, **kwargs):
        self.low, self.high, self.above_low = low, high, above_low
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        in_range(option_string or self.dest, values, self.low, self.high, self.above_low)
        setattr(namespace, self.dest, values)


def in_range(flag: str, value, low: float, high: float = math.inf, above_low: bool = False) -> None:
    """Refuse NaN, infinity and values outside [low, high] ((low, high] with above_low), naming `flag`."""
    try:
        check_setting("flag", value, low, high, above_low)
    except SettingError as err:
        raise NanoLladaError(err.worded({"flag": flag})) from None


def output_file(path, flag: str) -> Path:
    """Check at the start, creating nothing, that the file `path` can be written at the end: a run must not lose its
    work to a missing folder, and a failed run must leave nothing behind."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise NanoLladaError(f"{flag} {path}: is a directory; give a file name")
    if not folder.is_dir():
        raise NanoLladaError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another {flag}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NanoLladaError(f"{flag} {path}: cannot write in {folder}; choose another {flag}")
    return path


def output_dir(path, flag: str) -> Path:
    """The output_file check for a folder written at the end (created then, with its parents): the nearest existing
    folder above it must be writable, and nothing on the way may be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NanoLladaError(f"{flag} {path}: is a file, not a directory; choose another {flag}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NanoLladaError(f"{flag} {path}: {existing} is a file, not a directory; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NanoLladaError(f"{flag} {path}: cannot write in {existing}; choose another {flag}")
    return path


def positive(name: str, value, allow_zero: bool = False) -> None:
    """Refuse a negative (or zero) value, and NaN and infinity, which no count or rate means."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NanoLladaError(f"{name} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise NanoLladaError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
