"""One checkpoint format, written atomically, plus the import of official MiniMind2 `.pth` state dicts.

`weights/<run>.pt` (full): kind, config, tokenizer identity, weights, optimizer, step, RNG, data position.
`weights/<run>_state_dict.pt` (weights-only): kind, config, tokenizer identity, weights.
Both carry the config, so loading never guesses a shape from the tensors: the head count, the YaRN settings or the
vocabulary padding cannot be read off the weights, and a wrong guess builds a model that loads but computes
something else.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.config import ModelConfig
from model.errors import NanoLladaError
from model.tokenizer import check_tokenizer_matches
from model.transformer import Transformer

FORMAT = "nano-llada"
FORMAT_VERSION = 1
KINDS = ("ar", "diffusion")
KIND_NAMES = {"ar": "an AR", "diffusion": "a diffusion"}  # for messages
# The entry point that evaluates each kind, named when a checkpoint of the other kind is given.
SCRIPT_FOR_KIND = {"ar": "scripts.eval.eval_minimind", "diffusion": "scripts.eval.eval_diffusion"}


@dataclass
class Checkpoint:
    kind: str  # "ar" | "diffusion"
    config: ModelConfig
    state_dict: dict
    tokenizer: dict | None = None  # {"vocab_size", "sha256"}; None for MiniMind2 imports
    source: str = FORMAT  # FORMAT or "minimind2"
    extra: dict = field(default_factory=dict)  # optimizer, step, rng, data position, train config ...


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same directory, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plain_state_dict(model: torch.nn.Module) -> dict:
    """Weights on the CPU without torch.compile / DDP wrappers' prefixes."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def save_checkpoint(path, kind: str, config: ModelConfig, model, tokenizer_identity: dict | None, **extra) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": config.to_dict(),
        "tokenizer": tokenizer_identity,
        "model": plain_state_dict(model),
        **extra,
    }
    atomic_save(payload, path)


def _load_failure(err: Exception) -> str:
    """torch.load's reason in a few words. Its weights-only refusal advises weights_only=False, which runs code from
    the file: never the fix here (this format holds only tensors and plain data), so keep only the detail."""
    text = str(err)
    if text.startswith("Weights only load failed"):
        detail = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        return f"damaged, or not a tensor file: {detail[0] if detail else 'unpickling failed'}; save or train it again"
    return f"{err.__class__.__name__}: {(text.splitlines() or ['no details'])[0]}"


def read_checkpoint(path: str | Path, num_attention_heads: int | None = None) -> Checkpoint:
    """Read this project's checkpoints (full or weights-only), a Hugging Face export directory, or an official
    MiniMind2 state dict."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face export (model/hf/convert.py; imported here because it imports this module)
        from model.hf.convert import read_hf_export

        return read_hf_export(path, num_attention_heads)
    if not path.is_file():
        raise NanoLladaError(f"{path}: checkpoint not found; train one first (see README) or check the path")
    if path.stat().st_size == 0:
        raise NanoLladaError(f"{path}: empty file (0 bytes), not a checkpoint; a run that was killed mid-save? retrain")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise NanoLladaError(f"{path}: not a readable PyTorch checkpoint ({_load_failure(err)})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        missing = [key for key in ("kind", "config", "model") if key not in payload]
        if missing or payload["kind"] not in KINDS:
            what = f"has no {', '.join(missing)}" if missing else f"has an unknown kind '{payload['kind']}'"
            raise NanoLladaError(f"{path}: a damaged nano-llada checkpoint ({what}); save or train it again")
        config = ModelConfig.from_dict(payload["config"])
        if num_attention_heads is not None and num_attention_heads != config.num_attention_heads:
            raise NanoLladaError(
                f"{path}: stores {config.num_attention_heads} attention heads, but {num_attention_heads} were "
                "requested; leave num_attention_heads unset (the stored count is used)"
            )
        extra = {
            k: v for k, v in payload.items() if k not in ("format", "version", "kind", "config", "tokenizer", "model")
        }
        return Checkpoint(payload["kind"], config, payload["model"], payload.get("tokenizer"), FORMAT, extra)
    if isinstance(payload, dict) and "model.embed_tokens.weight" in payload:
        return _from_minimind2(path, payload, num_attention_heads or 8)
    raise NanoLladaError(
        f"{path}: neither a nano-llada checkpoint nor a MiniMind2 state dict (no 'model.embed_tokens.weight')"
    )


def _from_minimind2(path: Path, state: dict, num_heads: int) -> Checkpoint:
    """MiniMind2 stores no config: derive shapes from the tensors, taking the head count from the caller
    (every released MiniMind2 model has 8). The `<|mask|>` row is appended as the mean embedding."""
    state = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items() if torch.is_tensor(v)}
    embed = state["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    if hidden % num_heads:
        raise NanoLladaError(
            f"{path}: hidden size {hidden} is not divisible by {num_heads} heads; pass the right num_attention_heads"
        )
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    head_dim = hidden // num_heads
    kv_heads = state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim
    if any(".experts." in k or ".gate.weight" in k for k in state):
        raise NanoLladaError(f"{path}: MiniMind2-MoE checkpoints are not supported (dense models only)")
    head = state.get("lm_head.weight")
    tied = head is None or torch.equal(head, embed)
    config = ModelConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab + 1,
        intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0],
        tie_word_embeddings=tied,
    )
    padding = torch.zeros(config.padded_vocab_size - vocab - 1, hidden)
    state["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True), padding])
    state["lm_head.weight"] = (
        state["model.embed_tokens.weight"] if tied else torch.cat([head, head.mean(0, keepdim=True), padding])
    )
    return Checkpoint("ar", config, state, None, "minimind2")


def build_model(checkpoint: Checkpoint, path="checkpoint") -> Transformer:
    model = Transformer(checkpoint.config)
    missing, unexpected = model.load_state_dict(checkpoint.state_dict, strict=False)
    if missing or unexpected:
        raise NanoLladaError(
            f"{path}: weights do not fit the stored config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


def load_model(path: str | Path, num_attention_heads: int | None = None, kind: str | None = None, device="cpu"):
    """Public loader: `model, config = load_model(path)`; logits are `model(input_ids)` of shape [B, T, V].

    Accepts full and weights-only nano-llada checkpoints and official MiniMind2 `.pth` files (fp16 or fp32).
    With `kind`, a checkpoint of the other kind is refused (scripts say which entry point takes it).
    """
    checkpoint = read_checkpoint(path, num_attention_heads)
    checkpoint = as_kind(checkpoint, path, kind, f"expected {kind}; load it as {checkpoint.kind}")
    model = build_model(checkpoint, path).to(device).eval()
    return model, checkpoint.config


def joint_record(ar_loss_weight: float) -> dict:
    """The checkpoint entry of a jointly trained diffusion model (nothing at weight 0: such checkpoints stay as
    they were)."""
    return {"joint": {"ar_loss_weight": ar_loss_weight}} if ar_loss_weight else {}


def ar_loss_weight(checkpoint: Checkpoint) -> float:
    """The AR loss weight the stage that wrote `checkpoint` trained with next to its diffusion loss (0: none)."""
    return float((checkpoint.extra.get("joint") or {}).get("ar_loss_weight", 0.0))


def decodes_causally(checkpoint: Checkpoint) -> bool:
    """Whether the weights are an AR model: an AR checkpoint, or a shifted diffusion one trained jointly with the
    causal next-token loss (its head is the AR head, and causal attention is what that loss trained)."""
    joint = checkpoint.kind == "diffusion" and ar_loss_weight(checkpoint) > 0 and checkpoint.config.logit_shift
    return checkpoint.kind == "ar" or joint


def as_ar(checkpoint: Checkpoint) -> Checkpoint:
    """A jointly trained diffusion checkpoint as the AR model it also is: kind "ar", and no logit shift, which only
    says how diffusion reads the outputs (a causal output predicts the next token either way), so what an AR
    trainer writes from it is a plain AR checkpoint."""
    config = dataclasses.replace(checkpoint.config, logit_shift=False)
    return dataclasses.replace(checkpoint, kind="ar", config=config)


def as_kind(checkpoint: Checkpoint, path, kind: str | None, advice: str) -> Checkpoint:
    """`checkpoint` as a checkpoint of `kind` (None: either). Asked for "ar", a jointly trained diffusion checkpoint
    is returned as its AR model (as_ar); the other kind is refused with `advice`."""
    if kind == "ar" and checkpoint.kind == "diffusion" and decodes_causally(checkpoint):
        checkpoint = as_ar(checkpoint)
    if kind is not None and checkpoint.kind != kind:
        raise NanoLladaError(f"{path}: is {KIND_NAMES[checkpoint.kind]} checkpoint, {advice}")
    return checkpoint


def check_compatible(
    checkpoint: Checkpoint, path, kind: str | None, tokenizer, tokenizer_dir, hint: str | None = None
) -> Checkpoint:
    """Refuse a checkpoint of the other kind (as_kind, naming what to do instead), another tokenizer, or another
    vocabulary."""
    hint = hint or f"evaluate it with `uv run python -m {SCRIPT_FOR_KIND[checkpoint.kind]}`"
    checkpoint = as_kind(checkpoint, path, kind, f"not {kind}; {hint}")
    check_tokenizer_matches(checkpoint.tokenizer, tokenizer, path, tokenizer_dir)
    if checkpoint.config.vocab_size != len(tokenizer):
        raise NanoLladaError(
            f"{path}: vocabulary {checkpoint.config.vocab_size} does not match the tokenizer in "
            f"{tokenizer_dir} ({len(tokenizer)} with <|mask|>)"
        )
    return checkpoint
