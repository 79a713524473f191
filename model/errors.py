"""One exception type for every mistake a user can fix (bad file, bad flag, wrong checkpoint)."""

from __future__ import annotations

import math
import string


class NanoLladaError(Exception):
    """Raised with a one-line message that names the file (and line) and says how to fix it.

    Entry points catch it, print the message and exit with status 2 (see scripts/common/cli.py).
    """


class SettingError(NanoLladaError):
    """A library parameter with an impossible value.

    The library knows its parameters, not the command lines or requests that set them, so the message writes
    each parameter it names as a `{name}` placeholder: str() reads in the library's own names ("steps 3 is ...")
    and an entry point rewords it in its own with `worded({"steps": "--gen-steps"})`.
    """

    def __init__(self, template: str):
        self.template = template
        self.params = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        super().__init__(self.worded({}))

    @property
    def param(self) -> str | None:
        """The parameter the message is about (the first it names)."""
        return self.params[0] if self.params else None

    def worded(self, names: dict[str, str]) -> str:
        """The message with each parameter called by its name in `names` (its own name when absent)."""
        return self.template.format_map({param: names.get(param, param) for param in self.params})


# The highest temperature a sampler takes (AR and diffusion alike): past it the scaled logits of any trained model
# differ by under 1 %, so the draw is uniform already, and a larger one (1e300) overflows float32 on the way.
MAX_TEMPERATURE = 1e4


def check_setting(name: str, value, low: float, high: float = math.inf, above_low: bool = False) -> None:
    """Refuse a sampler setting that is NaN, infinite or outside [low, high] ((low, high] with above_low), naming
    it as a `{name}` placeholder (a SettingError) for the entry point to reword."""
    finite = isinstance(value, int) or math.isfinite(value)  # (a huge int does not fit a float)
    if finite and (value > low if above_low else value >= low) and value <= high:
        return
    if high < math.inf:
        wanted = f"in {'(' if above_low else '['}{low:g}, {high:g}]"
    else:
        wanted = f"{'>' if above_low else '>='} {low:g}" if low > -math.inf else ""
    wanted = f"a finite number {wanted}".rstrip() if not finite else wanted
    raise SettingError(f"{{{name}}} must be {wanted}, got {value}")
