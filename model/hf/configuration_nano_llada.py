"""Hugging Face configuration of a nano-llada model (AR or diffusion), shipped with exports for trust_remote_code.

Self-contained: once exported it lives next to config.json and cannot import nano-llada. The shape and RoPE
fields mirror model/config.py's ModelConfig one to one, so an export reads back into a ModelConfig unchanged.
"""

from transformers import PretrainedConfig


class NanoLladaConfig(PretrainedConfig):
    model_type = "nano_llada"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        # "ar": causal LM (AutoModelForCausalLM); "diffusion": bidirectional masked LM (AutoModelForMaskedLM)
        kind="ar",
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=6401,
        intermediate_size=1408,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        dropout=0.0,
        inference_rope_scaling=False,
        rope_scaling_factor=16.0,
        rope_original_max_positions=2048,
        rope_beta_fast=32.0,
        rope_beta_slow=1.0,
        # Diffusion models converted from an AR model may keep its next-token head: the prediction for position j
        # is the output at position j - 1. Absent from exports written before it existed: those are unshifted.
        logit_shift=False,
        # Block-diffusion models: the block size they were trained with, so they decode block-causally with it.
        # None: a bidirectional model (and every export written before the field existed).
        block_size=None,
        # Joint AR + diffusion training's AR loss weight: > 0 (with the shift) means the same weights are also a
        # causal LM, so AutoModelForCausalLM loads a diffusion export too. 0: diffusion only (and older exports).
        ar_loss_weight=0.0,
        # Prompt-causal SFT: the prompt is read causally, the answer sees everything; NanoLladaForMaskedLM then needs
        # the prompt's length. False: every token sees the whole row (and every export written before the field).
        prompt_causal=False,
        mask_token_id=6400,
        tokenizer_identity=None,  # {"vocab_size", "sha256"} of the tokenizer the weights were trained with
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    ):
        if kind not in ("ar", "diffusion"):
            raise ValueError(f"kind must be 'ar' or 'diffusion', got {kind!r}")
        if logit_shift and kind != "diffusion":
            # An AR head already predicts the next token; a shift flag on an AR model could only be a mistake.
            raise ValueError("logit_shift is a property of diffusion models; an AR config must leave it False")
        self.kind = kind
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.vocab_size = vocab_size
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.dropout = dropout
        self.inference_rope_scaling = inference_rope_scaling
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_original_max_positions = rope_original_max_positions
        self.rope_beta_fast = rope_beta_fast
        self.rope_beta_slow = rope_beta_slow
        self.logit_shift = bool(logit_shift)
        self.block_size = block_size
        self.ar_loss_weight = float(ar_loss_weight)
        self.prompt_causal = bool(prompt_causal)
        self.mask_token_id = mask_token_id
        self.tokenizer_identity = tokenizer_identity
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
