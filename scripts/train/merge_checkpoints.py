"""Average the weights of a run's k best checkpoints by validation loss (LLaDA 2.0 top-k merge; offline, unlike EMA).

uv run python -m scripts.train.merge_checkpoints --run-name diffusion_wsd [--save-dir weights] [--k 3]
uv run python -m scripts.train.merge_checkpoints --run-name diffusion_wsd --checkpoints a.pt b.pt c.pt

Candidates: the snapshots a diffusion run keeps with --keep-top-k (listed in <save-dir>/<run>_topk.json), or
explicit --checkpoints (each must store its val_loss, as <run>_best.pt does). Writes <save-dir>/<run>_merged.pt,
a weights-only checkpoint of the same kind, config and tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.checkpoint import build_model, read_checkpoint, save_checkpoint
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from scripts.common.cli import Bounded, run_main
from scripts.common.training.topk import topk_index_path


def candidates(args) -> list[dict]:
    if args.checkpoints:
        found = []
        for path in args.checkpoints:
            extra = read_checkpoint(path).extra
            if "val_loss" not in extra:
                raise NanoLladaError(
                    f"{path}: stores no val_loss, so it cannot be ranked; pass checkpoints written at an evaluation "
                    f"(<run>_best.pt or --keep-top-k snapshots)"
                )
            found.append({"path": str(path), "step": extra.get("step"), "val_loss": float(extra["val_loss"])})
        return found
    index = topk_index_path(args.save_dir, args.run_name)
    if not index.exists():
        raise NanoLladaError(
            f"{index} not found: train with --keep-top-k K to keep the k best checkpoints, "
            f"or pass --checkpoints PATH [PATH ...]"
        )
    return json.loads(index.read_text(encoding="utf-8"))


def merge(entries: list[dict]):
    """(model with the fp32 mean of the weights, the best checkpoint); refuses mixed kinds, shapes or tokenizers."""
    best = read_checkpoint(entries[0]["path"])
    total = {name: tensor.float().clone() for name, tensor in best.state_dict.items()}
    for entry in entries[1:]:
        other = read_checkpoint(entry["path"])
        if (other.kind, other.config, other.tokenizer) != (best.kind, best.config, best.tokenizer):
            raise NanoLladaError(
                f"{entry['path']}: differs from {entries[0]['path']} in kind, model config or tokenizer; "
                f"merge checkpoints of one run only"
            )
        for name, tensor in other.state_dict.items():
            total[name] += tensor.float()
    model = build_model(best, entries[0]["path"])
    model.load_state_dict({name: tensor / len(entries) for name, tensor in total.items()})
    return model, best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-name", required=True)
    p.add_argument("--save-dir", default="weights")
    p.add_argument(
        "--k", type=int, action=Bounded, low=1, default=3, help="how many of the best checkpoints to average"
    )
    p.add_argument(
        "--checkpoints", nargs="+", default=None, help="rank these instead of the run's --keep-top-k snapshots"
    )
    args = p.parse_args(argv)
    ranked = sorted(candidates(args), key=lambda e: e["val_loss"])[: args.k]
    if not ranked:
        raise NanoLladaError("no checkpoints to merge")
    if len(ranked) < args.k:
        print(f"note: only {len(ranked)} checkpoint(s) available, merging those")
    sizes = [trained_block_size(read_checkpoint(e["path"]).extra) for e in ranked]
    block_size = sizes[0]  # the merged model decodes as the best checkpoint does
    if len(set(sizes)) > 1:
        print(
            f"note: the checkpoints were trained at different block sizes {[s or 'whole row' for s in sizes]} "
            f"(curriculum phases); the merge decodes like the best one ({block_size or 'bidirectional'}). "
            f"Pass --checkpoints to merge one phase only."
        )
    model, best = merge(ranked)
    out = Path(args.save_dir) / f"{args.run_name}_merged.pt"
    meta = {"merged_from": ranked, "block_diffusion": {"block_size": block_size} if block_size else {}}
    meta.update((k, v) for k, v in best.extra.items() if k in ("train_config", "diffusion", "joint"))
    save_checkpoint(out, best.kind, best.config, model, best.tokenizer, **meta)
    for e in ranked:
        print(f"  step {e['step']}: val loss {e['val_loss']:.4f}  {e['path']}")
    print(f"wrote {out}: mean of {len(ranked)} checkpoint(s)")
    return {"path": str(out), "merged": ranked}


if __name__ == "__main__":
    run_main(main)
