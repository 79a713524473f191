"""Training throughput of both routes for scripts/bench.py: the real losses (next_token_loss, diffusion_loss), the
real optimizer (make_optimizer), bf16 autocast and torch.compile on CUDA; a few warmup steps, then timed steps on one
random batch already on the device (the model step, not the data loader). Reports tokens/s, model FLOPs utilisation
against the device's dense bf16 peak, and peak memory.
"""

import time
from dataclasses import dataclass

import torch

from model.config import BASE_VOCAB_SIZE, ModelConfig
from model.objectives.ar_loss import next_token_loss
from model.objectives.diffusion_loss import diffusion_loss
from model.transformer import Transformer
from scripts.common.bench.report import peak_bf16_flops
from scripts.common.device import autocast, compiled, eager_on_compile_failure, synchronize
from scripts.common.training.optimization import TrainConfig, make_optimizer


@dataclass
class BenchSettings:
    preset: str = "minimind2_small"
    seq_len: int = 256
    train_batch: int = 128
    warmup_steps: int = 5
    timed_steps: int = 20
    compile: bool = True
    dtype: str = "bfloat16"


TINY = BenchSettings(preset="tiny", seq_len=32, train_batch=4, warmup_steps=1, timed_steps=2, compile=False)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6 x (weights used in matmuls) + 12 x layers x hidden x seq (attention scores and mixing, forward + backward).

    The PaLM / nanoGPT convention: attention is counted in full for causal models too, embedding lookups are free,
    the (tied) LM head counts. Same formula for AR and diffusion, so their MFUs compare like for like.
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    matmul_weights = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + config.padded_vocab_size * h
    return 6 * matmul_weights + 12 * layers * h * seq_len


def bench_training(kind: str, config: ModelConfig, s: BenchSettings, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    optimizer = make_optimizer(model, TrainConfig(run_name="bench", kind=kind, max_steps=1), device)
    use_compile = s.compile and device.type == "cuda"
    forward_model = compiled(model, "inductor") if use_compile else model
    data = torch.randint(1, BASE_VOCAB_SIZE, (s.train_batch, s.seq_len), device=device)
    rng = torch.Generator(device=device).manual_seed(0)
    mask_id = config.vocab_size - 1  # <|mask|> is the last id (load_tokenizer appends it); no tokenizer here

    def step() -> None:
        with autocast(device, s.dtype):
            if kind == "ar":
                loss = next_token_loss(forward_model, data)
            else:
                loss = diffusion_loss(forward_model, data, rng, mask_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the trainer clips too (grad_clip 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def drop_compile() -> None:  # the timed steps then measure eager training, and the record says so
        nonlocal forward_model, use_compile
        forward_model, use_compile = model, False

    compile_start = time.perf_counter()
    eager_on_compile_failure(step, drop_compile, print)  # the first call compiles
    for _ in range(s.warmup_steps - 1):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(s.timed_steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_per_s = s.timed_steps * s.train_batch * s.seq_len / seconds
    peak = peak_bf16_flops(device)
    achieved = tokens_per_s * training_flops_per_token(config, s.seq_len)
    return {
        "tokens_per_s": tokens_per_s,
        "compiled": use_compile,
        "step_seconds": seconds / s.timed_steps,
        "warmup_seconds": warmup_seconds,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
