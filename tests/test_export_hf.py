"""HF export: transformers loads it with trust_remote_code, logits equal ours, AR generate() equals model.ar.generate,
and load_model reads the directory back."""

import json

import pytest
import torch
from conftest import lively_model

from model.ar import generate
from model.checkpoint import load_model, save_checkpoint
from model.config import preset
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts import export_hf as export_script

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(".")


def tiny_model(tokenizer, **overrides) -> Transformer:
    config = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=128, **overrides)
    torch.manual_seed(0)
    return lively_model(config)


def export(tmp_path, tokenizer, model, kind) -> str:
    checkpoint = tmp_path / f"{kind}.pt"
    save_checkpoint(checkpoint, kind, model.config, model, tokenizer_identity(tokenizer))
    out = tmp_path / f"{kind}_hf"
    export_script.main(["--checkpoint", str(checkpoint), "--out", str(out), "--tokenizer-dir", "."])
    return str(out)


def test_ar_export_logits_generate_and_reload(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    out = export(tmp_path, tokenizer, model, "ar")
    config = json.loads(open(f"{out}/config.json").read())
    assert config["kind"] == "ar" and "AutoModelForCausalLM" in config["auto_map"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # re-tied on load

    ids = torch.randint(0, 6400, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)
        # incremental decoding through HF's cache equals the full causal pass
        first = hf(ids[:, :16], use_cache=True)
        rest = hf(ids[:, 16:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(rest.logits, model(ids)[:, 16:], atol=1e-5, rtol=0)

    prompt = [1, 300, 301, 302, 303]
    ours = list(generate(model, prompt, 24, eos_id=2))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    assert theirs == ours and len(set(ours)) > 3

    reloaded, reloaded_config = load_model(out, kind="ar")
    assert reloaded_config == model.config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), model(ids), atol=0, rtol=0)

    exported_tokenizer = load_tokenizer(out)  # with <|mask|> and the chat template, same identity
    assert tokenizer_identity(exported_tokenizer) == tokenizer_identity(tokenizer)
    assert exported_tokenizer.chat_template == tokenizer.chat_template


def test_diffusion_export_bidirectional_logits(tmp_path, tokenizer):
    model = tiny_model(
        tokenizer, tie_word_embeddings=False, inference_rope_scaling=True, rope_original_max_positions=32
    )
    out = export(tmp_path, tokenizer, model, "diffusion")
    ids = torch.randint(0, 6401, (2, 40))
    with torch.no_grad():
        ours = model(ids, attention="bidirectional")
        for auto_class in (transformers.AutoModelForMaskedLM, transformers.AutoModel):
            hf = auto_class.from_pretrained(out, trust_remote_code=True).eval()
            assert type(hf).__name__ == "NanoLladaForMaskedLM"
            torch.testing.assert_close(hf(ids).logits, ours, atol=1e-5, rtol=0)
    reloaded, config = load_model(out, kind="diffusion")
    assert config == model.config
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention="bidirectional"), ours, atol=0, rtol=0)
