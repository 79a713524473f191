"""LLaDA 2.0's warmup-stable-decay (WSD) curriculum of the block size, and the block size a checkpoint decodes with."""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import SettingError

WARMUP, STABLE, DECAY = "warmup", "stable", "decay"


def default_sizes_up(seq_len: int) -> list[int]:
    """1, 4, 16, 64 (those below L that divide it), then L."""
    return [s for s in (1, 4, 16, 64) if s < seq_len and seq_len % s == 0] + [seq_len]


def default_sizes_down(seq_len: int, inference_block_size: int = 32) -> list[int]:
    """L, L/2, L/4, ... while the half divides evenly and stays >= the inference block size (LLaDA 2.0 decays to 32)."""
    sizes = [seq_len]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= inference_block_size:
        sizes.append(sizes[-1] // 2)
    return sizes


@dataclass(frozen=True)
class BlockCurriculum:
    """LLaDA 2.0's warmup-stable-decay of the block size (not of the LR): a pure function of the optimizer step.

    warmup: BDLM through sizes_up (each size an equal share of the phase); stable: MDLM on the whole row (block = L);
    decay: BDLM through sizes_down, ending at the inference block size.
    """

    seq_len: int
    total_steps: int
    sizes_up: tuple[int, ...]
    sizes_down: tuple[int, ...]
    phase_ratios: tuple[float, float, float] = (0.3, 0.5, 0.2)

    def __post_init__(self) -> None:
        for name, sizes in (("sizes_up", self.sizes_up), ("sizes_down", self.sizes_down)):
            if not sizes:
                raise SettingError(f"{{{name}}} is empty; give at least one block size")
            bad = [s for s in sizes if s <= 0 or self.seq_len % s]
            if bad:
                raise SettingError(
                    f"{{{name}}}: block size(s) {bad} do not divide {{seq_len}} {self.seq_len}; "
                    f"use divisors of {self.seq_len} (e.g. {default_sizes_up(self.seq_len)})"
                )
        if any(a > b for a, b in zip(self.sizes_up, self.sizes_up[1:])):
            raise SettingError(f"{{sizes_up}} must not decrease, got {list(self.sizes_up)}")
        if any(a < b for a, b in zip(self.sizes_down, self.sizes_down[1:])):
            raise SettingError(f"{{sizes_down}} must not increase, got {list(self.sizes_down)}")
        if len(self.phase_ratios) != 3 or min(self.phase_ratios) < 0 or abs(sum(self.phase_ratios) - 1) > 1e-6:
            raise SettingError(
                f"{{phase_ratios}} must be three non-negative numbers summing to 1, got {list(self.phase_ratios)}"
            )

    @property
    def inference_block_size(self) -> int:
        return self.sizes_down[-1]

    def boundaries(self) -> tuple[int, int]:
        """First step of the stable phase and first step of the decay phase."""
        warmup, stable, _ = self.phase_ratios
        return round(warmup * self.total_steps), round((warmup + stable) * self.total_steps)

    def at(self, step: int) -> tuple[str, int]:
        """(phase, block size) at optimizer step `step` (0-based)."""
        stable_start, decay_start = self.boundaries()
        if step < stable_start:
            return WARMUP, self.sizes_up[len(self.sizes_up) * step // stable_start]
        if step < decay_start or decay_start >= self.total_steps:
            return STABLE, self.seq_len
        span = self.total_steps - decay_start
        return DECAY, self.sizes_down[
            min(len(self.sizes_down) * (step - decay_start) // span, len(self.sizes_down) - 1)
        ]


def trained_block_size(extra: dict) -> int | None:
    """Block size a checkpoint decodes with block-causally, or None for a bidirectional (MDLM) model.

    Read from an explicit {"block_diffusion": {"block_size": K}} entry (merged or SFT checkpoints), else from the
    stored curriculum at the checkpoint's step: a checkpoint saved during warmup or decay was trained as a BDLM
    with that step's block size; one saved in the stable phase is a plain MDLM.
    """
    explicit = extra.get("block_diffusion") or {}
    if explicit.get("block_size"):
        return int(explicit["block_size"])
    stored = (extra.get("diffusion") or {}).get("block_curriculum")
    if not stored or not extra.get("step"):
        return None
    fields = {name: tuple(value) if isinstance(value, list) else value for name, value in stored.items()}
    last_step = int(extra["step"]) - 1  # the last step the weights were trained at
    phase, block_size = BlockCurriculum(**fields).at(last_step)
    return None if phase == STABLE else block_size
