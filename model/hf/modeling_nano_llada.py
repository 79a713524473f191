"""Hugging Face modelling code of a nano-llada model, shipped with exports for trust_remote_code.

Self-contained (it cannot import nano-llada once exported): a compact copy of model/transformer.py's math,
with the same parameter names (MiniMind2's), so a nano-llada state dict loads without a key map and the
logits are the same to float rounding. tests/test_export_hf.py holds the two implementations equal.

  NanoLladaForCausalLM   AR checkpoints: causal attention, KV cache through HF's Cache API, works with generate().
  NanoLladaForMaskedLM   diffusion checkpoints: bidirectional attention; predict the <|mask|> positions.
  NanoLladaModel         the backbone (hidden states), causal for AR and bidirectional for diffusion configs.

Prompt-causal models (config.prompt_causal, from prompt-causal diffusion SFT) read the prompt causally and the
answer bidirectionally: NanoLladaForMaskedLM takes the prompt's length (`prompt_length`) to build that mask.

Logit shift (config.logit_shift): a diffusion model converted from an AR model may keep the AR head, so the
prediction for position j is the head's output at position j - 1. NanoLladaForMaskedLM applies it, so its
logits[:, j] is always the prediction for token j, shifted or not; column 0 of a shifted model repeats its own
output, a placeholder (nothing precedes position 0, which is always context), and its label is ignored.
NanoLladaModel returns hidden states position by position, unshifted. A shifted model is a diffusion model: the
config refuses logit_shift on kind "ar", and NanoLladaForCausalLM refuses a shifted config, since it would run
a bidirectionally trained model causally and pass it off as an AR model.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput

from .configuration_nano_llada import NanoLladaConfig


def rope_frequencies(config) -> torch.Tensor:
    """theta^(-2i/d), rescaled by YaRN (MiniMind2's parameterisation) when config.inference_rope_scaling is set."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.inference_rope_scaling and config.max_position_embeddings > config.rope_original_max_positions:
        half, s = dim // 2, config.rope_scaling_factor
        longer = (2 * math.pi / inv_freq > config.rope_original_max_positions).nonzero()
        corr_dim = int(longer[0]) if len(longer) else half
        beta = config.rope_beta_slow + (config.rope_beta_fast - config.rope_beta_slow) * torch.arange(
            half, dtype=torch.float64
        ) / max(half - 1, 1)
        scale = torch.where(
            torch.arange(half) < corr_dim, (beta * s - beta + 1) / (beta * s), torch.full_like(beta, 1.0 / s)
        )
        inv_freq = inv_freq * scale
    return inv_freq.float()


def apply_rope(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class NanoLladaRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class NanoLladaAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, is_causal, past_key_values):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class NanoLladaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NanoLladaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = NanoLladaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = NanoLladaAttention(config, layer_idx)
        self.post_attention_layernorm = NanoLladaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = NanoLladaMLP(config)

    def forward(self, x, cos, sin, mask, is_causal, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class NanoLladaPreTrainedModel(PreTrainedModel):
    config_class = NanoLladaConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanoLladaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        # nano-llada's init (N(0, 0.02)); only used for weights missing from a checkpoint.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=0.02)
        elif isinstance(module, NanoLladaRMSNorm):
            module.weight.fill_(1.0)


class NanoLladaModel(NanoLladaPreTrainedModel):
    """Embedding, layers, final norm: the `model.` prefix of the parameter names. Returns hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(NanoLladaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = NanoLladaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self._inv_freq = {}  # per device; computed lazily, not a buffer, so meta-device init never touches it
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope(self, positions):
        """cos, sin of shape [..., T, head_dim] for integer positions [..., T]."""
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_frequencies(self.config).to(device)
        angles = positions.float()[..., None] * self._inv_freq[device]
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half pairing: dim i pairs with i + d/2
        return angles.cos(), angles.sin()

    def _mask(self, attention_mask, causal, T, past, device):
        """(boolean mask [B, 1, T, past+T] or None, is_causal) for SDPA; no dense mask when none is needed."""
        S = past + T
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask[:, :S].all())
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask, False
        if not padded:
            if not causal:
                return None, False
            if past == 0:
                return None, T > 1
            if T == 1:
                return None, False
        allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
        if causal:  # query i sits at position past+i and sees keys 0..past+i
            allowed = (torch.arange(S, device=device)[None, :] <= (past + torch.arange(T, device=device))[:, None])[
                None, None
            ]
        if padded:
            allowed = allowed & attention_mask[:, None, None, :S].bool()
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries attend everywhere instead of NaN
        return allowed, False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        causal=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        causal = self.config.kind == "ar" if causal is None else causal
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and past_key_values is None and causal:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} positions exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = self._rope(position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        mask, is_causal = self._mask(attention_mask, causal, T, past, x.device)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, past_key_values)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(x), past_key_values=past_key_values if use_cache else None
        )


class _NanoLladaWithHead(NanoLladaPreTrainedModel):
    """The backbone plus an output head (tied to the embedding unless the config unties it)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = NanoLladaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value


class NanoLladaForCausalLM(_NanoLladaWithHead, GenerationMixin):
    def __init__(self, config):
        if getattr(config, "logit_shift", False) and not getattr(config, "ar_loss_weight", 0.0):
            raise ValueError(
                "this config is a logit-shifted diffusion model; load it with AutoModelForMaskedLM, not as a causal LM "
                "(only a jointly trained one, ar_loss_weight > 0, is also a causal LM)"
            )
        super().__init__(config)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.model(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, causal=True
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # next-token loss, -100 ignored (model/inference/ar.py's next_token_loss)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


class NanoLladaForMaskedLM(_NanoLladaWithHead):
    """Diffusion model: bidirectional logits over every position, logits[:, j] predicting token j (with the logit
    shift applied when config.logit_shift is set); sample by unmasking <|mask|> (config.mask_token_id)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        prompt_length=None,
        **kwargs,
    ):
        if getattr(self.config, "prompt_causal", False):
            attention_mask = self._prompt_causal_mask(input_ids, attention_mask, prompt_length)
        out = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds, use_cache=False, causal=False)
        logits = self.lm_head(out.last_hidden_state)
        if getattr(self.config, "logit_shift", False):
            # Token j is predicted at position j - 1; column 0 keeps its own output as a placeholder.
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            if labels is not None:  # nothing predicts position 0
                labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, 1:]], dim=1)
        loss = None
        if labels is not None:  # plain masked-token cross-entropy (-100 ignored), not LLaDA's 1/t-weighted ELBO
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)

    @staticmethod
    def _prompt_causal_mask(input_ids, attention_mask, prompt_length):
        """A prompt-causal model's [B, 1, T, T] mask: columns before prompt_length (an int or [B]) see only those up
        to themselves, the rest every column; a 2-D attention_mask hides padding keys. A 4-D mask passes through."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if prompt_length is None:
            raise ValueError(
                "this model reads its prompt causally (config.prompt_causal): pass prompt_length, the number of "
                "prompt tokens in front of the answer (or a 4-D attention_mask)"
            )
        T = input_ids.shape[1]
        columns = torch.arange(T, device=input_ids.device)
        start = torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1, 1)
        mask = (columns[None, None, :] <= columns[None, :, None]) | (columns[None, :, None] >= start)
        if attention_mask is not None:
            mask = (mask & attention_mask[:, None, :].bool()) | torch.eye(T, dtype=torch.bool, device=mask.device)
        return mask[:, None]
