"""The eval scripts and the server check sampler arguments with one validation (the samplers' check_arguments):
every impossible value is one line from an eval script and a 400 naming the field from the server, with the same
message in their own names."""

import math

import pytest
import torch
from conftest import lively_model

from model.checkpoint import save_checkpoint
from model.config import preset
from model.errors import NanoLladaError
from model.tokenizer import load_tokenizer, tokenizer_identity
from scripts import serve
from scripts.common.serving.engine import RequestError
from scripts.eval import eval_diffusion, eval_minimind

MESSAGES = [{"role": "user", "content": "你好"}]
# eval flag -> server request field
FIELDS = {
    "--threshold": "threshold",
    "--steps": "steps",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--top-k": "top_k",
    "--max-new-tokens": "max_tokens",
}
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tokenizer = load_tokenizer(".")
    config = preset("tiny", vocab_size=len(tokenizer), max_position_embeddings=64)
    paths = {}
    for kind in ("ar", "diffusion"):
        torch.manual_seed(0)
        paths[kind] = tmp_path_factory.mktemp(kind) / f"{kind}.pt"
        save_checkpoint(paths[kind], kind, config, lively_model(config), tokenizer_identity(tokenizer))
    return paths


@pytest.fixture(scope="module")
def engines(checkpoints):
    flags = ["--tokenizer-dir", ".", "--device", "cpu", "--block-length", "4", "--max-tokens", "8"]
    return {
        kind: serve.load_engine(serve.parse_args(["--checkpoint", str(path), *flags]))
        for kind, path in checkpoints.items()
    }


def refusals(kind, checkpoints, engines, flag, value) -> tuple[str, RequestError]:
    """(the eval script's one-line error, the server's RequestError) for `flag value` / {field: value}."""
    field = FIELDS[flag]
    common = ["--checkpoint", str(checkpoints[kind]), "--tokenizer-dir", ".", "--device", "cpu", "--prompt", "你好"]
    script = eval_diffusion if kind == "diffusion" else eval_minimind
    sizes = ["--max-new-tokens", "8", "--block-length", "4"] if kind == "diffusion" else ["--max-new-tokens", "8"]
    with pytest.raises(NanoLladaError) as from_eval:
        script.main([*common, *sizes, flag, str(value)])
    body = {"messages": MESSAGES, "max_tokens": 8, field: value}
    with pytest.raises(RequestError) as from_server:
        engines[kind].parse(body)
    return str(from_eval.value), from_server.value


BAD = [
    ("diffusion", "--threshold", 1.5),
    ("diffusion", "--threshold", -0.2),
    ("diffusion", "--threshold", NAN),
    ("diffusion", "--threshold", 0),
    ("diffusion", "--steps", 0),
    ("diffusion", "--temperature", -1),
    ("diffusion", "--temperature", NAN),
    ("diffusion", "--max-new-tokens", 0),
    ("ar", "--temperature", -1),
    ("ar", "--temperature", INF),
    ("ar", "--top-p", 5),
    ("ar", "--top-p", 0),
    ("ar", "--top-p", NAN),
    ("ar", "--top-k", -1),
    ("ar", "--max-new-tokens", 0),
]


@pytest.mark.parametrize("kind, flag, value", BAD)
def test_eval_and_server_refuse_the_same_values_with_the_same_message(checkpoints, engines, kind, flag, value):
    from_eval, from_server = refusals(kind, checkpoints, engines, flag, value)
    field = FIELDS[flag]
    assert "\n" not in from_eval and from_eval.startswith(f"{flag} must be")
    assert from_server.status == 400 and from_server.param == field
    # one validation: the server's message is the eval script's, in the request's names
    assert from_eval.replace(flag, field).startswith(from_server.message), (from_eval, from_server.message)


def test_good_values_pass_both(checkpoints, engines):
    request = engines["diffusion"].parse({"messages": MESSAGES, "max_tokens": 8, "threshold": 1, "steps": 2})
    assert request.sampler.threshold == 1.0 and request.sampler.steps == 2
    assert engines["ar"].parse({"messages": MESSAGES, "max_tokens": 8, "top_p": 1, "temperature": 0}).top_p == 1.0
    common = ["--tokenizer-dir", ".", "--device", "cpu", "--max-new-tokens", "4"]
    out = eval_diffusion.main(
        ["--checkpoint", str(checkpoints["diffusion"]), *common, "--block-length", "4", "--threshold", "1"]
    )
    assert out["sample"]["nfe"] >= 1


@pytest.mark.parametrize("flag, value", [("--cfg-scale", NAN), ("--gen-cfg-scale", -1)])
def test_eval_only_flags_are_checked_too(checkpoints, flag, value):
    """Checked by the library and named as the flag of the field (the seed spelling is an alias of it)."""
    flags = ["--checkpoint", str(checkpoints["diffusion"]), "--tokenizer-dir", ".", "--device", "cpu"]
    with pytest.raises(NanoLladaError, match="^--cfg-scale must be"):
        eval_diffusion.main([*flags, "--max-new-tokens", "4", flag, str(value)])


def test_server_defaults_are_checked_at_start(checkpoints):
    flags = ["--checkpoint", str(checkpoints["diffusion"]), "--tokenizer-dir", ".", "--device", "cpu"]
    with pytest.raises(NanoLladaError, match=r"^--threshold must be in \(0, 1\], got 1.5"):
        serve.load_engine(serve.parse_args([*flags, "--threshold", "1.5"]))
    with pytest.raises(NanoLladaError, match="^--steps must be >= 1, got 0"):  # the field's flag; --gen-steps: alias
        serve.load_engine(serve.parse_args([*flags, "--gen-steps", "0"]))
    with pytest.raises(NanoLladaError, match="^--max-tokens must be >= 1, got 0"):
        serve.load_engine(serve.parse_args([*flags, "--max-tokens", "0"]))


def test_sft_accuracy_refuses_zero_diffusion_steps_before_reading_anything(tmp_path):
    from scripts.eval import eval_sft_accuracy

    argv = ["--diffusion-checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "none.jsonl")]
    with pytest.raises(NanoLladaError, match="^--steps must be >= 1, got 0$"):
        eval_sft_accuracy.main([*argv, "--tokenizer-dir", ".", "--gen-steps", "0"])


def test_the_schedule_flag_gives_the_sampler_its_noise_schedule(checkpoints):
    """--schedule is the sampler's NoiseSchedule: linear by default (LLaDA's even split), cosine when asked; a name
    it does not know is refused while argv is parsed."""
    import argparse

    from model.inference.sampling import DiffusionSamplerConfig
    from model.objectives.schedule import LINEAR, NoiseSchedule
    from scripts.common.evaluation.sampler_flags import SamplerFlags
    from scripts.common.settings import add_flags, settings_from

    parser = argparse.ArgumentParser()
    add_flags(parser, SamplerFlags)
    assert settings_from(SamplerFlags, parser.parse_args([])).asked(8).schedule == LINEAR
    cosine = settings_from(SamplerFlags, parser.parse_args(["--schedule", "cosine"])).asked(8)
    assert cosine.schedule == NoiseSchedule("cosine") and cosine.steps == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule", "cubic"])
    flags = ["--checkpoint", str(checkpoints["diffusion"]), "--tokenizer-dir", ".", "--device", "cpu"]
    with pytest.raises(NanoLladaError, match="^--schedule fixes each step.s commits; --threshold commits"):
        eval_diffusion.main([*flags, "--max-new-tokens", "8", "--schedule", "cosine", "--threshold", "0.9"])
    with pytest.raises(NanoLladaError, match="schedule must be a model.objectives.schedule.NoiseSchedule"):
        DiffusionSamplerConfig(8, 8, schedule="cosine").validate()
    nfe = {name: eval_diffusion.main([*flags, "--max-new-tokens", "8", "--schedule", name])["sample"]["nfe"]
           for name in ("linear", "cosine")}  # fmt: skip
    assert nfe == {"linear": 8, "cosine": 6}  # the cosine quotas of 8 tokens over 8 steps leave two steps empty


@pytest.mark.parametrize("flag, value", [("--threshold", "0.9"), ("--schedule", "cosine"), ("--gen-steps", "4")])
def test_speculative_decoding_refuses_the_sampler_flags_it_ignores(checkpoints, flag, value):
    """Self-speculation reproduces AR greedy output: a diffusion sampler flag would be silently ignored."""
    flags = ["--checkpoint", str(checkpoints["diffusion"]), "--tokenizer-dir", ".", "--device", "cpu"]
    name = {"--gen-steps": "--steps"}.get(flag, flag)  # named as the field's own flag
    with pytest.raises(NanoLladaError, match=f"^--decoding speculative gives AR greedy output: {name} does not apply"):
        eval_diffusion.main([*flags, "--max-new-tokens", "4", "--decoding", "speculative", flag, value])
    out = eval_diffusion.main([*flags, "--max-new-tokens", "4", "--decoding", "speculative", "--block-length", "2"])
    assert 1 <= len(out["sample"]["tokens"]) <= 4
