"""Download MiniMind's training data (and optionally MiniMind2's tokenizer and weights) from ModelScope.

uv run python -m scripts.data.download [--out-dir dataset] [--files pretrain_hq.jsonl sft_mini_512.jsonl dpo.jsonl] \
    [--minimind2] [--force]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.errors import NanoLladaError

DATASET_REPO = "gongjy/minimind_dataset"
# Pretraining, SFT and DPO (chosen / rejected conversations, about 0.9 GB) data, one file per stage.
DEFAULT_FILES = ("pretrain_hq.jsonl", "sft_mini_512.jsonl", "dpo.jsonl")
# (ModelScope model repo, file). The weight names follow MiniMind's README (pretrain_512.pth, full_sft_512.pth).
# Not verified here (no network): that -PyTorch holds only .pth files, so the tokenizer is taken from the
# transformers-format repo gongjy/MiniMind2; if a name moved, edit this table.
MINIMIND2_FILES = (
    ("gongjy/MiniMind2", "tokenizer.json"),
    ("gongjy/MiniMind2", "tokenizer_config.json"),
    ("gongjy/MiniMind2-PyTorch", "pretrain_512.pth"),
    ("gongjy/MiniMind2-PyTorch", "full_sft_512.pth"),
)
MANUAL_HELP = (
    f"download by hand with `modelscope download --dataset {DATASET_REPO} pretrain_hq.jsonl --local_dir ./dataset`, "
    "or work offline with `uv run python -m scripts.data.sample`"
)


def download(repo: str, filename: str, out_dir: Path, is_dataset: bool, force: bool = False) -> Path:
    """Fetch one file into out_dir (skipped if it is already there); every failure becomes a NanoLladaError."""
    target = out_dir / filename
    if target.exists() and not force:
        print(f"{target}: already there, skipped (--force to download again)")
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # imported here: modelscope is slow to import and only this command needs it
        from modelscope.hub.file_download import dataset_file_download, model_file_download

        fetch = dataset_file_download if is_dataset else model_file_download
        # local_dir writes the file at out_dir/filename (no cache-tree layout); modelscope writes to a temp name first
        fetched = Path(fetch(repo, filename, local_dir=str(out_dir)))
    except Exception as err:  # ImportError, network and HTTP errors all get the same remedy
        raise NanoLladaError(
            f"could not download {filename} from ModelScope {repo} ({err.__class__.__name__}: {err}); {MANUAL_HELP}"
        ) from None
    if not target.is_file() and fetched.is_file():  # an older modelscope may have kept its own layout
        fetched.replace(target)
    if not target.is_file():
        raise NanoLladaError(f"ModelScope reported success but {target} is missing; {MANUAL_HELP}")
    print(f"{target}: downloaded ({target.stat().st_size / 2**20:.1f} MiB)")
    return target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=f"Download MiniMind data from the ModelScope dataset {DATASET_REPO}.")
    parser.add_argument("--out-dir", default="dataset")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="files of the dataset repo to fetch")
    parser.add_argument(
        "--minimind2", action="store_true", help="also fetch MiniMind2's tokenizer and weights into OUT_DIR/minimind2/"
    )
    parser.add_argument("--force", action="store_true", help="download again even if a file exists")
    return parser.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    paths = [download(DATASET_REPO, name, out_dir, is_dataset=True, force=args.force) for name in args.files]
    if args.minimind2:
        paths += [
            download(repo, name, out_dir / "minimind2", is_dataset=False, force=args.force)
            for repo, name in MINIMIND2_FILES
        ]
    return paths


if __name__ == "__main__":
    from scripts.common.cli import run_main

    run_main(main)
