"""HF export: transformers loads it with trust_remote_code, logits equal ours, AR generate() equals
model.inference.ar.generate, and load_model reads the directory back. A logit-shifted diffusion model exports its
shifted predictions."""

import json
import sys

import pytest
import torch
from conftest import lively_model

from model.checkpoint import load_model, save_checkpoint
from model.config import preset
from model.errors import NanoLladaError
from model.inference.ar import generate
from model.logit_shift import read_shifted
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
    assert json.loads(open(f"{out}/config.json").read())["logit_shift"] is False
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


def test_shifted_diffusion_export_returns_shifted_predictions(tmp_path, tokenizer):
    model = tiny_model(tokenizer, logit_shift=True)
    out = export(tmp_path, tokenizer, model, "diffusion")
    config = json.loads(open(f"{out}/config.json").read())
    assert config["logit_shift"] is True and "AutoModelForCausalLM" not in config["auto_map"]
    ids = torch.randint(0, 6401, (2, 40))
    labels = ids.clone()
    with torch.no_grad():
        outputs = model(ids, attention="bidirectional")
        predictions = read_shifted(outputs)
        for auto_class in (transformers.AutoModelForMaskedLM, transformers.AutoModel):
            hf = auto_class.from_pretrained(out, trust_remote_code=True).eval()
            result = hf(ids, labels=labels)
            torch.testing.assert_close(result.logits, predictions, atol=1e-5, rtol=0)
            # position 0 has no prediction: its label is left out of the loss
            expected = torch.nn.functional.cross_entropy(outputs[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            torch.testing.assert_close(result.loss, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(predictions, outputs, atol=1e-3)  # the shift is not a no-op on these weights
    # the causal class would run a bidirectionally trained model causally: it refuses a shifted config
    causal_class = sys.modules[type(hf).__module__].NanoLladaForCausalLM
    with pytest.raises(ValueError, match="logit-shifted diffusion model"):
        causal_class(hf.config)

    reloaded, reloaded_config = load_model(out, kind="diffusion")
    assert reloaded_config == model.config and reloaded_config.logit_shift is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention="bidirectional"), outputs, atol=0, rtol=0)


def test_export_written_before_the_shift_field_reads_unshifted(tmp_path, tokenizer):
    model = tiny_model(tokenizer)
    out = export(tmp_path, tokenizer, model, "diffusion")
    path = tmp_path / "diffusion_hf" / "config.json"
    config = json.loads(path.read_text())
    del config["logit_shift"]
    path.write_text(json.dumps(config))
    _, reloaded_config = load_model(out, kind="diffusion")
    assert reloaded_config == model.config and reloaded_config.logit_shift is False
    ids = torch.randint(0, 6401, (1, 16))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert hf.config.logit_shift is False
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids, attention="bidirectional"), atol=1e-5, rtol=0)


def test_shifted_ar_checkpoint_is_refused(tmp_path, tokenizer):
    model = tiny_model(tokenizer, logit_shift=True)
    with pytest.raises(NanoLladaError, match="only diffusion models are shifted"):
        export(tmp_path, tokenizer, model, "ar")


def test_a_prompt_causal_export_reads_the_prompt_causally(tmp_path, tokenizer):
    from model.prompt_causal import prompt_causal_mask

    model = tiny_model(tokenizer, logit_shift=True, prompt_causal=True)
    out = export(tmp_path, tokenizer, model, "diffusion")
    assert json.loads(open(f"{out}/config.json").read())["prompt_causal"] is True
    ids = torch.randint(0, 6401, (2, 20))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = read_shifted(model(ids, attention=prompt_causal_mask(torch.tensor([8, 12]), 20)))
        got = hf(ids, prompt_length=torch.tensor([8, 12])).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="prompt_length"):
            hf(ids)
    reloaded, config = load_model(out, kind="diffusion")
    assert config == model.config and config.prompt_causal
