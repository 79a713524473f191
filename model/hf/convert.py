"""Write a nano-llada checkpoint as a Hugging Face directory, and read such a directory back.

An export holds config.json (with auto_map), model.safetensors, the tokenizer with <|mask|>, and the
modelling code, so `AutoModelForCausalLM` (AR) or `AutoModelForMaskedLM` / `AutoModel` (diffusion)
load it with trust_remote_code=True. `read_hf_export` turns it back into a Checkpoint for load_model.
config.json carries ModelConfig.logit_shift; an export written before the field existed reads as unshifted.
A shifted model is a diffusion model, exported for AutoModelForMaskedLM only (see modeling_nano_llada.py), unless it
was trained jointly with the AR loss (config.json's ar_loss_weight > 0): then AutoModelForCausalLM loads it as well.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from model.config import MASK_TOKEN, ModelConfig
from model.errors import NanoLladaError

CODE_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_nano_llada.py", "modeling_nano_llada.py")
MODEL_TYPE = "nano_llada"
WEIGHTS = "model.safetensors"
CONFIG_CLASS = "configuration_nano_llada.NanoLladaConfig"
# Which transformers Auto class loads which kind. A diffusion model also answers to AutoModel with logits,
# as LLaDA's own release does, since "hidden states only" is of little use for a masked-diffusion LM.
ARCHITECTURE = {"ar": "NanoLladaForCausalLM", "diffusion": "NanoLladaForMaskedLM"}
AUTO_MAP = {
    "ar": {
        "AutoConfig": CONFIG_CLASS,
        "AutoModel": "modeling_nano_llada.NanoLladaModel",
        "AutoModelForCausalLM": "modeling_nano_llada.NanoLladaForCausalLM",
    },
    "diffusion": {
        "AutoConfig": CONFIG_CLASS,
        "AutoModel": "modeling_nano_llada.NanoLladaForMaskedLM",
        "AutoModelForMaskedLM": "modeling_nano_llada.NanoLladaForMaskedLM",
    },
}


def export_hf(checkpoint_path, out_dir, tokenizer_dir, num_attention_heads: int | None = None) -> dict:
    """Write the export; returns its config as a dict. The tokenizer must be the one the checkpoint was trained with."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from model.checkpoint import ar_loss_weight, decodes_causally, read_checkpoint
    from model.hf.configuration_nano_llada import NanoLladaConfig
    from model.objectives.block_curriculum import trained_block_size
    from model.tokenizer import (
        BOS_ID,
        EOS_ID,
        PAD_ID,
        check_tokenizer_matches,
        load_tokenizer,
        mask_token_id,
        tokenizer_identity,
    )

    checkpoint = read_checkpoint(checkpoint_path, num_attention_heads)
    _check_shift_kind(checkpoint.kind, checkpoint.config, checkpoint_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer_matches(checkpoint.tokenizer, tokenizer, checkpoint_path, tokenizer_dir)
    if checkpoint.config.vocab_size != len(tokenizer):
        raise NanoLladaError(
            f"{checkpoint_path}: vocabulary {checkpoint.config.vocab_size} does not match the tokenizer in "
            f"{tokenizer_dir} ({len(tokenizer)} with <|mask|>); pass the --tokenizer-dir it was trained with"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NanoLladaError(f"{out}: exists and is not a directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    state = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint.state_dict.items()}
    vocab = checkpoint.config.vocab_size  # the export holds the real vocabulary only (no padding rows)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            state[name] = state[name][:vocab].contiguous()
    if checkpoint.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no shared tensors; the loader re-ties the head
    dtype = next(iter(state.values())).dtype
    kind = checkpoint.kind
    joint = ar_loss_weight(checkpoint) if decodes_causally(checkpoint) else 0.0
    config = NanoLladaConfig(
        kind=kind,
        **{**checkpoint.config.to_dict(), "pad_vocab_multiple": 1},
        mask_token_id=mask_token_id(tokenizer),
        block_size=trained_block_size(checkpoint.extra),  # how it decodes: without it, bidirectionally
        ar_loss_weight=joint,  # also a causal LM
        training_pad_vocab_multiple=checkpoint.config.pad_vocab_multiple,
        tokenizer_identity=checkpoint.tokenizer or tokenizer_identity(tokenizer),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=[ARCHITECTURE[kind]],
        auto_map={
            **AUTO_MAP[kind],
            **({"AutoModelForCausalLM": AUTO_MAP["ar"]["AutoModelForCausalLM"]} if joint else {}),
        },
        dtype=str(dtype).removeprefix("torch."),
    )
    # Every field written (no diff against class defaults), so read_hf_export needs no transformers.
    config.to_json_file(out / "config.json", use_diff=False)
    save_file(state, out / WEIGHTS, metadata={"format": "pt"})
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, out / name)
    tokenizer.mask_token = MASK_TOKEN  # so tokenizer.mask_token_id works for transformers users
    tokenizer.save_pretrained(out)
    if kind == "ar":
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out)
    return json.loads((out / "config.json").read_text())


def _check_shift_kind(kind: str, config: ModelConfig, path) -> None:
    """A logit-shifted model is a diffusion model: an AR one so flagged would be served with wrong predictions."""
    if config.logit_shift and kind != "diffusion":
        raise NanoLladaError(
            f"{path}: {kind} model with logit_shift set; only diffusion models are shifted, so the file is "
            "inconsistent: re-save it as a diffusion checkpoint or with logit_shift off"
        )


def read_hf_export(path, num_attention_heads: int | None = None):
    """A Checkpoint from an export directory (kind, ModelConfig and tokenizer identity from config.json)."""
    from safetensors.torch import load_file

    from model.checkpoint import KINDS, Checkpoint, joint_record

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / WEIGHTS).is_file():
        raise NanoLladaError(
            f"{path}: a directory without config.json and {WEIGHTS}; "
            "export one with the Hugging Face export entry point first"
        )
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise NanoLladaError(f"{path}/config.json: not readable JSON ({err})") from None
    if data.get("model_type") != MODEL_TYPE or data.get("kind") not in KINDS:
        raise NanoLladaError(
            f"{path}: not a nano-llada export (model_type {data.get('model_type')!r}, kind {data.get('kind')!r})"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    config = ModelConfig(**{k: v for k, v in data.items() if k in fields})  # no logit_shift key: unshifted
    config.pad_vocab_multiple = int(data.get("training_pad_vocab_multiple", 1))  # back to the training layout
    if num_attention_heads is not None and num_attention_heads != config.num_attention_heads:
        raise NanoLladaError(
            f"{path}: stores {config.num_attention_heads} attention heads, "
            f"but {num_attention_heads} were requested; drop the flag"
        )
    _check_shift_kind(data["kind"], config, path)
    state = load_file(str(path / WEIGHTS))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:  # re-append the zero padding rows the export left out
            rows = state[name]
            state[name] = torch.cat([rows, rows.new_zeros(config.padded_vocab_size - rows.shape[0], rows.shape[1])])
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    extra = {"block_diffusion": {"block_size": data["block_size"]}} if data.get("block_size") else {}
    extra.update(joint_record(float(data.get("ar_loss_weight") or 0.0)))
    return Checkpoint(data["kind"], config, state, data.get("tokenizer_identity"), "hf-export", extra)
