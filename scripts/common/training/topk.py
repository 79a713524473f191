"""The k best checkpoints of a run by validation loss, kept during training (scripts/train/diffusion.py
--keep-top-k) for LLaDA 2.0's top-k merge (scripts/train/merge_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path


def topk_index_path(save_dir, run_name: str) -> Path:
    return Path(save_dir) / f"{run_name}_topk.json"


class TopKCheckpoints:
    """Keeps weights-only snapshots of the k evaluations with the lowest validation loss, and their index.

    offer() saves a snapshot when it enters the top k and deletes the one it pushes out; the index
    (<run>_topk.json: path, step, val_loss per entry, best first) is rewritten each time.
    """

    def __init__(self, save_dir, run_name: str, k: int, resume: bool = False):
        self.save_dir, self.run_name, self.k = Path(save_dir), run_name, k
        self.index = topk_index_path(save_dir, run_name)
        self.entries: list[dict] = (
            json.loads(self.index.read_text(encoding="utf-8")) if resume and self.index.exists() else []
        )

    def offer(self, step: int, val_loss: float, save) -> None:
        """`save(path)` writes the current weights; called only when (step, val_loss) makes the top k."""
        self.entries = [e for e in self.entries if e["step"] != step]  # a resumed run may re-evaluate a step
        if len(self.entries) >= self.k and val_loss >= max(e["val_loss"] for e in self.entries):
            return
        path = self.save_dir / f"{self.run_name}_top_step{step}.pt"
        save(path)
        self.entries = sorted(
            self.entries + [{"path": str(path), "step": step, "val_loss": val_loss}], key=lambda e: e["val_loss"]
        )
        for dropped in self.entries[self.k :]:
            Path(dropped["path"]).unlink(missing_ok=True)
        self.entries = self.entries[: self.k]
        self.index.parent.mkdir(parents=True, exist_ok=True)
        self.index.write_text(json.dumps(self.entries, indent=1), encoding="utf-8")
