"""The prepared GPU check in its CPU mode: the command runs every stage, prints greppable lines, writes its JSON
and exits 0; a stage past its limit is cut and reported; an unusable GPU stops the check at once."""

import json
import os
import re
import subprocess
import sys
import time

from conftest import ROOT

import scripts.gpu_check.__main__ as gpu_check
from scripts.gpu_check.report import Context, Report

LINE = re.compile(r"^(PASS|FAIL|SKIP) (\w+)\.([\w.]+)(: .*)?$")


def test_the_cpu_mode_runs_every_stage_and_reports_each_result_as_a_line_and_in_the_json(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.gpu_check", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [m.groups()[:3] for m in map(LINE.match, done.stdout.splitlines()) if m]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["summary"]["FAIL"] == 0
    assert [(c["status"], c["stage"], c["name"]) for c in report["checks"]] == lines  # every line saved, in order
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(gpu_check.STAGES, "done")
    passed = {f"{stage}.{name}" for status, stage, name in lines if status == "PASS"}
    for route in ("ar", "mdlm", "bdlm32_doc_flex", "mdlm_crop", "mdlm_eager"):
        assert {f"training.{route}.ran", f"training.{route}.loss_falls"} <= passed
    assert {"training.mdlm.no_probe", "kernels.cross_entropy.chunked", "kernels.flex_vs_sdpa.document"} <= passed
    assert "kernels.flex_vs_sdpa.sft_prompt_causal" in passed  # diffusion SFT's default mask
    assert {"decoding.ar_cached_vs_uncached", "decoding.block_causal_cached_vs_uncached"} <= passed
    assert {"bench.training.ar", "bench.training.diffusion"} <= passed
    routes = report["stages"]["training"]["routes"]
    assert routes["ar"]["last_loss"] < routes["ar"]["first_loss"] and routes["mdlm"]["tokens_per_s"] > 0
    assert (tmp_path / "work" / "weights" / "ar_state_dict.pt").exists() and (out / "bench" / "bench.json").exists()
    assert not (out / "weights").exists()  # checkpoints stay out of the folder a device run sends back


def test_a_stage_past_its_limit_is_cut_reported_and_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ALARM_GRACE_S", 0.0)
    report = Report(tmp_path / "gpu_check.json")
    ctx = Context(tmp_path, None, None, report)

    def hangs(ctx):
        ctx.check("PASS", "before", "measured before the hang")
        while True:
            time.sleep(0.01)

    gpu_check.run_stage(ctx, "training", hangs, 0.3)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(c["status"], c["name"]) for c in saved["checks"]] == [("PASS", "before"), ("SKIP", "time_limit")]
    assert saved["stages"]["training"]["status"] == "cut" and saved["stages"]["training"]["seconds"] < 2


def test_an_nvidia_gpu_that_cuda_cannot_use_stops_the_check_at_once(tmp_path, monkeypatch, capsys):
    reason = "an NVIDIA GPU is present but CUDA is unusable: (the driver) ..."
    monkeypatch.setattr("scripts.gpu_check.kernels.unusable_gpu_reason", lambda: reason)
    argv = ["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--stages", "kernels,training"]
    assert gpu_check.main(argv) == 1
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(c["status"], c["stage"], c["name"], c["detail"]) for c in saved["checks"]] == [
        ("FAIL", "env", "cuda", reason)
    ]
    assert f"FAIL env.cuda: {reason}" in capsys.readouterr().out.splitlines()


class _CudaContext(Context):
    """The check's context as on a GPU, so the CUDA-only judgements run on the CPU."""

    @property
    def cuda(self):
        return True


def _judged(tmp_path, route_name: str, **changes) -> dict:
    from argparse import Namespace

    import torch

    from model.config import ModelConfig
    from scripts.gpu_check import training

    ctx = _CudaContext(tmp_path, torch.device("cpu"), Namespace(min_tokens_per_s=1e6), Report(tmp_path / "r.json"))
    ctx.stage, ctx.work = "training", tmp_path
    ctx.shared.update(seq_len=256, batch_size=128, config=ModelConfig(vocab_size=6401))
    healthy = dict(steps=30, unique_graphs=2, graph_breaks=0, peak_gib=6.0, attention_line=None, wall_s=80.0)
    healthy |= dict(compile_fallback=False, first_loss=8.7, last_loss=6.0, ms_per_step=21.8, mfu=0.26)
    healthy |= dict(tokens_per_s=1.5e6, min_tokens_per_s=1.4e6, max_tokens_per_s=1.6e6, first_window_tokens_per_s=2e5)
    route = next(r for r in training.routes(ctx) if r.name == route_name)
    training.judge_route(ctx, route, healthy | changes)
    return {c["name"].split(".", 1)[1]: c["status"] for c in ctx.report.record["checks"]}


def test_the_cuda_judgements_pass_a_healthy_run_and_fail_each_symptom(tmp_path):
    assert set(_judged(tmp_path / "a", "ar").values()) == {"PASS"}
    assert set(_judged(tmp_path / "b", "mdlm").values()) == {"PASS"}
    flex = "attention: FlexAttention for explicit masks (its forward and backward probe passed)"
    assert set(_judged(tmp_path / "c", "bdlm32_doc_flex", unique_graphs=3, attention_line=flex).values()) == {"PASS"}
    sick = _judged(tmp_path / "d", "mdlm", compile_fallback=True, last_loss=9.0, tokens_per_s=4e5, peak_gib=40.0)
    failed = {"loss_falls", "compiled", "memory", "speed"}
    assert {name for name, status in sick.items() if status == "FAIL"} == failed and sick["ran"] == "PASS"
    sdpa = "attention: SDPA for explicit masks (FlexAttention failed its probe: ...)"
    assert _judged(tmp_path / "e", "bdlm32_doc_flex", attention_line=sdpa)["attention"] == "FAIL"
    assert _judged(tmp_path / "f", "mdlm_crop", unique_graphs=6)["compiled"] == "FAIL"  # more than the 4 lengths
