"""The one transformer, used causally (AR) and bidirectionally (diffusion).

Pre-norm decoder in MiniMind2's shape: RMSNorm, RoPE (theta 1e6, rotate-half, optional YaRN), grouped-query
attention through scaled_dot_product_attention, SwiGLU MLP, final RMSNorm, head tied to the embedding.
Parameter names are MiniMind2's (model.layers.N.self_attn.q_proj ...), so a MiniMind2 state dict loads
strictly instead of through a key map. Nothing here knows about AR or diffusion objectives.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from model.config import ModelConfig
from model.cross_entropy import logits_or_nll
from model.errors import NanoLladaError

try:  # FlexAttention: dense masks (document, block diffusion) run block-sparse on CUDA instead of as an SDPA bias
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: SDPA with the boolean mask everywhere
    BlockMask = None

# How attention may look: "causal" (AR), "bidirectional" (diffusion) or an explicit boolean mask
# broadcastable to [B, heads, T, S] where True means "may attend".
Attention = str | torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: bf16 mean-of-squares loses too many bits at hidden 512.
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), rescaled by YaRN when config.inference_rope_scaling is set.

    YaRN as MiniMind2 parameterises it: pairs whose wavelength fits in the original context
    (i < corr_dim) are interpolated by (beta*s - beta + 1)/(beta*s), beta ramping from beta_slow to
    beta_fast over the pairs; longer wavelengths are divided by the factor s.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.inference_rope_scaling and config.max_position_embeddings > config.rope_original_max_positions:
        half = dim // 2
        s = config.rope_scaling_factor
        wavelengths = 2 * math.pi / inv_freq
        longer = (wavelengths > config.rope_original_max_positions).nonzero()
        corr_dim = int(longer[0]) if len(longer) else half
        beta = config.rope_beta_slow + (config.rope_beta_fast - config.rope_beta_slow) * torch.arange(
            half, dtype=torch.float64
        ) / max(half - 1, 1)
        scale = torch.where(
            torch.arange(half) < corr_dim, (beta * s - beta + 1) / (beta * s), torch.full_like(beta, 1.0 / s)
        )
        inv_freq = inv_freq * scale
    return inv_freq.float()


def rope_table(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
    angles = torch.outer(positions, rope_frequencies(config))
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half pairing: dim i pairs with i + d/2
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


@functools.cache
def compiled_flex_attention():
    """FlexAttention's fused kernel exists only compiled: wrapped once, for eager callers only (wrapping at import
    would import the compiler, ~10 s, into every process). Shapes become dynamic after a recompile."""
    return torch.compile(flex_attention)


def flex_attention_kernel(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention: inside a compiled model the plain function, which the model's graph traces into its kernel
    (no wrapper is created or looked up inside a trace); called eagerly on CUDA, the compiled wrapper; eager on the
    CPU (forward only: tests and the probe)."""
    if torch.compiler.is_compiling() or not q.is_cuda:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def tracing() -> bool:
    """Whether tensors here are being traced (torch.compile, fake tensors) rather than computed: a Python-side
    cache must neither keep nor hand out such tensors."""
    return torch.compiler.is_compiling() or detect_fake_mode() is not None


# Block masks of shared (document-free) masks, by the dense mask they were built from: model.block_attention hands
# out one dense tensor per (length, block size), so each is built once instead of every step. An entry holds its
# mask, so no other tensor can take its id while it is cached; the version counter catches in-place edits.
_SHARED_BLOCK_MASKS: dict[int, tuple[torch.Tensor, int, object]] = {}
_SHARED_BLOCK_MASKS_KEPT = 16


def block_mask_from_dense(mask: torch.Tensor, T: int, S: int):
    """A FlexAttention BlockMask equal to a boolean mask broadcastable to [B, 1, T, S] (True = may attend)."""
    dense = mask.reshape(-1, T, S) if mask.dim() == 4 else mask.reshape(1, T, S)
    if dense.shape[0] > 1:  # per-row (document) masks change with every batch: nothing to reuse
        return create_block_mask(lambda b, h, q, k: dense[b, q, k], dense.shape[0], None, T, S, device=mask.device)
    single = dense[0]
    if tracing():  # traced into the graph, which runs it on the device each step
        return create_block_mask(lambda b, h, q, k: single[q, k], None, None, T, S, device=mask.device)
    cached = _SHARED_BLOCK_MASKS.get(id(mask))
    if cached is not None and cached[0] is mask and cached[1] == mask._version:
        return cached[2]
    block_mask = create_block_mask(lambda b, h, q, k: single[q, k], None, None, T, S, device=mask.device)
    if len(_SHARED_BLOCK_MASKS) >= _SHARED_BLOCK_MASKS_KEPT:
        _SHARED_BLOCK_MASKS.pop(next(iter(_SHARED_BLOCK_MASKS)))
    _SHARED_BLOCK_MASKS[id(mask)] = (mask, mask._version, block_mask)
    return block_mask


class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    `length` is how many positions are filled; a forward pass with a cache appends its T new positions.
    `crop` rolls back (used to discard speculative or not-yet-final positions).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device, dtype=torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a boolean mask or indices): rows that finished decoding leave the batch."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, kv_cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)
        # enable_gqa: query head h reads key/value head h // (heads / kv_heads), MiniMind2's grouping.
        if BlockMask is not None and isinstance(mask, BlockMask):
            y = flex_attention_kernel(q, k, v, mask, enable_gqa=self.num_kv_heads != self.num_heads)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        grouped = self.num_kv_heads != self.num_heads
        if grouped and mask is not None:
            # No fused SDPA kernel takes a mask with fewer key/value heads (flash takes no mask, memory-efficient no
            # grouping), so the math kernel would run with fp32 scores. Expanded heads let memory-efficient apply.
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=grouped and mask is None,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, is_causal, kv_cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, layers and final norm; the `model.` prefix of MiniMind2's key names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Explicit masks (document / block diffusion) use FlexAttention when training on CUDA; SDPA otherwise
        # (_use_flex). flex_attention is cleared before training where FlexAttention fails its probe.
        self.flex_attention, self.flex_on_cpu = True, False
        cos, sin = rope_table(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: shrink the residual-branch outputs so the residual stream does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.num_hidden_layers))
        with torch.no_grad():  # padding rows: never read as inputs, their logits are cut off
            self.model.embed_tokens.weight[config.vocab_size :] = 0
            self.lm_head.weight[config.vocab_size :] = 0

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention: Attention = "causal",
        kv_cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | slice | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for input_ids [B, T].

        With a kv_cache the T tokens continue the cached positions and are appended to the cache.
        `positions` overrides the position of each token (e.g. the clean half of a block-diffusion input).
        `logits_at` (indices or a slice along T, or per-row indices [B, K]) computes the final norm and head only
        there: [B, len, V].
        `targets` [B, len] (IGNORE_INDEX where unscored): the fp32 cross-entropy of each output instead of the
        logits, so a compiled model holds the loss in its graph (model/cross_entropy.py).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            if past + T > self.config.max_position_embeddings:
                raise NanoLladaError(
                    f"sequence of {past + T} positions exceeds max_position_embeddings="
                    f"{self.config.max_position_embeddings}"
                )
            cos, sin = self.rope_cos[past : past + T], self.rope_sin[past : past + T]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if cos.dim() == 3:  # per-row positions [B, T, D] -> broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask, is_causal = self._attention_mask(attention, T, past, input_ids.device)
        embedded = self.model.dropout(self.model.embed_tokens(input_ids))
        # The kernel was chosen before training (model.block_attention.choose_flex): a failure here is a real error.
        if mask is not None and self._use_flex(mask):
            mask = block_mask_from_dense(mask, T, past + T)
        x = embedded
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + T
        if isinstance(logits_at, torch.Tensor) and logits_at.dim() == 2:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        elif logits_at is not None:
            x = x[:, logits_at]
        logits = self.lm_head(self.model.norm(x))[..., : self.config.vocab_size]  # padding ids are never predicted
        return logits_or_nll(logits, targets)

    def _use_flex(self, mask: torch.Tensor) -> bool:
        # Training with document and block-diffusion masks: they vary by query and are block sparse, and FlexAttention
        # skips the empty blocks. Without gradients (evaluation, decoding) the masks change shape from call to call
        # and are cheap as dense SDPA masks, so a compiled kernel per shape would not pay. A padding mask (one row
        # shared by every query, [B, 1, 1, S]) has nothing to skip. flex_on_cpu forces FlexAttention (tests).
        if BlockMask is None or not self.flex_attention or mask.shape[-2] == 1:
            return False
        return self.flex_on_cpu or (mask.is_cuda and torch.is_grad_enabled())

    @staticmethod
    def _attention_mask(attention: Attention, T: int, past: int, device) -> tuple[torch.Tensor | None, bool]:
        """(explicit mask or None, is_causal) for SDPA; no dense mask whenever the flash path can be used."""
        if isinstance(attention, torch.Tensor):
            if attention.dtype != torch.bool:
                raise NanoLladaError("an explicit attention mask must be boolean (True = may attend)")
            return attention, False
        if attention == "bidirectional":
            return None, False
        if attention != "causal":
            raise NanoLladaError(
                f"unknown attention mode '{attention}'; use 'causal', 'bidirectional' or a boolean mask"
            )
        if past == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new query may see every cached key
        # T new queries after `past` cached keys: query i sees keys 0..past+i (bottom-right aligned).
        keys = torch.arange(past + T, device=device)
        return keys[None, :] <= (past + torch.arange(T, device=device))[:, None], False

    def new_kv_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A cache in the dtype keys and values come out in: under autocast (bf16 on a GPU) that is the autocast
        dtype, so no step casts the cache it writes or reads."""
        param = self.lm_head.weight
        kind = param.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else param.dtype
        return KVCache(self.config, batch_size, max_length, param.device, dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
