"""What the eval entry points share: loading a checkpoint of the right kind with its tokenizer, held-out rows, the
flags that name checkpoints and the device."""

from __future__ import annotations

from dataclasses import dataclass

from model.checkpoint import build_model, check_compatible, read_checkpoint
from model.errors import NanoLladaError
from model.objectives.block_curriculum import trained_block_size
from model.tokenizer import load_tokenizer
from scripts.common.data.packing import PackedRows, tokenize_to_cache
from scripts.common.settings import flag


def add_checkpoint_flags(p, checkpoint_help: str, several: bool = False) -> None:
    """--checkpoint (repeatable with `several`), --tokenizer-dir and --num-attention-heads, spelled as every entry
    point that reads a checkpoint spells them."""
    p.add_argument("--checkpoint", required=True, action="append" if several else "store", help=checkpoint_help)
    p.add_argument("--tokenizer-dir", default=".", help="the tokenizer the checkpoint was trained with")
    p.add_argument("--num-attention-heads", type=int, default=None, help="only for MiniMind2 .pth files (default 8)")


@dataclass
class Device:
    """Where an eval runs, and in what precision."""

    dtype: str = flag("bfloat16", "autocast dtype on CUDA (CPU runs float32)", choices=["bfloat16", "float32"])
    device: str | None = flag(None, "cpu, cuda, mps, ... (default: the best this machine has)")


@dataclass
class SFTCheckpoints(Device):
    """The checkpoints the SFT evals (eval_sft_one_prompt, eval_sft_accuracy) run: either route or both."""

    tokenizer_dir: str = flag(".", "the tokenizer the checkpoints were trained with")
    minimind_checkpoint: str | None = flag(None, "AR SFT checkpoint")
    diffusion_checkpoint: str | None = flag(None, "diffusion SFT checkpoint")

    def routes(self) -> list[tuple[str, str, str]]:
        """(name, path, kind) of the checkpoints given."""
        if not self.minimind_checkpoint and not self.diffusion_checkpoint:
            raise NanoLladaError("give --minimind-checkpoint, --diffusion-checkpoint, or both")
        routes = [("AR", self.minimind_checkpoint, "ar"), ("Diffusion", self.diffusion_checkpoint, "diffusion")]
        return [route for route in routes if route[1]]


def load_checkpoint_for_eval(
    checkpoint_path, tokenizer_dir, kind: str | None, device, num_attention_heads: int | None = None
):
    """(model in eval mode, tokenizer, checkpoint) after the compatibility checks; the file is read once."""
    checkpoint = read_checkpoint(checkpoint_path, num_attention_heads)
    tokenizer = load_tokenizer(tokenizer_dir)
    checkpoint = check_compatible(checkpoint, checkpoint_path, kind, tokenizer, tokenizer_dir)  # joint: as AR
    return build_model(checkpoint, checkpoint_path).to(device).eval(), tokenizer, checkpoint


def load_any_kind(path, tokenizer_dir, device, num_attention_heads=None):
    """(model, tokenizer, kind, block size) for a checkpoint of either kind, with the compatibility checks. The block
    size is that of a block-trained diffusion checkpoint (scored with the block estimators), else None."""
    model, tokenizer, checkpoint = load_checkpoint_for_eval(path, tokenizer_dir, None, device, num_attention_heads)
    block_size = trained_block_size(checkpoint.extra) if checkpoint.kind == "diffusion" else None
    if block_size:
        print(f"note: {path} was trained with block diffusion; it is scored block by block (block size {block_size})")
    return model, tokenizer, checkpoint.kind, block_size


@dataclass
class HeldOutRows:
    """Held-out rows to score: --eval-data packed into rows of --seq-len tokens as in training."""

    eval_data: str | None = flag(None, "held-out jsonl/txt")
    jsonl_field: str = flag("text", "the field of a jsonl row that holds its text")
    seq_len: int = flag(256, "row length (use the trained one)", "--max-seq-len", low=2)
    eval_batch_size: int = flag(16, "rows per forward", low=1)
    eval_max_batches: int = flag(8, "rows scored = batch size x this (fewer if the file is short)", low=1)

    def batches(self, tokenizer) -> list:
        """The first --eval-max-batches batches of rows (the same rows every time)."""
        rows = PackedRows(tokenize_to_cache(self.eval_data, tokenizer, self.jsonl_field)[0], self.seq_len)
        n, size = min(rows.num_rows, self.eval_batch_size * self.eval_max_batches), self.eval_batch_size
        return [rows.gather(range(i, min(i + size, n))) for i in range(0, n, size)]
