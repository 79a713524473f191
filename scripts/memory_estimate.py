"""Peak GPU memory of one training step, estimated from the model shape (no GPU needed; nothing is measured).

The default is the seed diffusion command (README: `scripts.train.diffusion ... --init-from-minimind
weights/minimind_pretrain_state_dict.pt --batch-size 96`, sequence length 256, MiniMind2-Small's shape, bf16
autocast, AdamW): a bidirectional (MDLM) step of a logit-shifted model. Counts what autograd keeps between forward
and backward in eager PyTorch, so an upper bound for a compiled step (inductor recomputes the cheap parts).

    uv run python -m scripts.memory_estimate [--batch-size 96] [--seq-len 256] [--block-diffusion]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from model.config import ModelConfig, preset
from model.cross_entropy import CHUNK_ROWS
from model.transformer import Transformer

GB = 1e9
FP32, BF16 = 4, 2


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one training step at its peak (the start of the backward)."""

    weights_and_adamw: float  # fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter
    activations: float  # per-layer tensors saved for the backward, final norm included
    logits_and_loss: float  # head output and what the loss keeps and makes for its backward

    @property
    def total(self) -> float:
        return self.weights_and_adamw + self.activations + self.logits_and_loss


def saved_bytes_per_token_and_layer(config: ModelConfig) -> int:
    """What one layer keeps for the backward per token under bf16 autocast, the residual stream in fp32."""
    h, kv, inner = config.hidden_size, config.num_key_value_heads * config.head_dim, config.intermediate_size
    norms = 2 * (2 * h * FP32)  # each RMSNorm keeps its fp32 input and its normalised output
    linear_inputs = (3 + 1 + 2) * h * BF16  # autocast's bf16 copy for q/k/v, o (attention output), gate/up
    attention = (h + 2 * kv) * BF16 + config.num_attention_heads * FP32  # rotated q, k, v; log-sum-exp per head
    mlp = 4 * inner * BF16  # gate, silu(gate), up and their product (the down projection's input)
    return norms + linear_inputs + attention + h * BF16 + mlp  # + the attention output the o projection reads


LOSSES = {
    "compiled": "cross-entropy inside the compiled forward (CUDA, compiled)",
    "chunked": "chunked fp32 cross-entropy (CUDA, --no-compile)",
    "plain": "eager F.cross_entropy on .float(), as before either",
}


def step_memory(config: ModelConfig, batch: int, seq_len: int, block_diffusion: bool, loss: str) -> StepMemory:
    """The step's peak; block_diffusion runs 2L tokens through the layers and L through the head. `loss`: a key of
    LOSSES."""
    with torch.device("meta"):  # the real parameter count, without allocating anything
        params = Transformer(config).num_parameters()
    tokens = batch * seq_len * (2 if block_diffusion else 1)
    activations = tokens * config.num_hidden_layers * saved_bytes_per_token_and_layer(config)
    head_rows = batch * seq_len  # only the outputs the loss reads reach the final norm and the head
    activations += head_rows * (2 * config.hidden_size * FP32 + config.hidden_size * BF16)
    head_out, kept = head_rows * config.padded_vocab_size * BF16, head_rows * config.vocab_size * BF16
    if loss == "compiled":  # the graph keeps the head's bf16 output and a log-sum-exp per row; backward: its gradient
        held = head_out + head_out + head_rows * FP32
    elif loss == "chunked":  # keeps the bf16 logits; backward: their bf16 gradient, the padded one, one fp32 chunk
        held = kept + kept + head_out + min(CHUNK_ROWS, head_rows) * config.vocab_size * FP32
    else:  # F.cross_entropy(logits.float()): fp32 log-softmax kept; backward: two fp32 gradients, bf16 casts
        fp32 = head_rows * config.vocab_size * FP32
        held = fp32 + 2 * fp32 + kept + head_out
    return StepMemory(16 * params, activations, held)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--block-diffusion", action="store_true", help="BDLM on [x_t ; x_0] (2L tokens per row)")
    args = p.parse_args(argv)
    config = preset("minimind2_small")  # the AR seed command's shape that --init-from-minimind carries over
    for loss, label in LOSSES.items():
        m = step_memory(config, args.batch_size, args.seq_len, args.block_diffusion, loss)
        print(
            f"{label}: weights+grads+AdamW {m.weights_and_adamw / GB:.2f} GB, activations {m.activations / GB:.2f} GB, "
            f"logits+loss {m.logits_and_loss / GB:.2f} GB, total {m.total / GB:.2f} GB "
            "(+ CUDA context and allocator slack, not counted)"
        )


if __name__ == "__main__":
    main()
