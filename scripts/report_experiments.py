"""The CPU experiments of technical_report.md, reproducible on a 2-core machine.

uv run python -m scripts.report_experiments [--part all|conversion|dpo|sft] [--jobs 2] [--steps 500] [--sft-steps 200]
(--part sft: the diffusion SFT objectives over seeds, scripts/common/experiments/sft_objectives.py)

On the embedded sample, with one small model shape (hidden 128, 4 layers, 4 heads, 2 KV heads):
1. AR pretraining; 2. diffusion initialised from it with each AR-to-diffusion conversion (no logit shift, shift,
   shift + block-wise attention, + position-dependent masking) and 3. diffusion from scratch, at equal steps;
4. AR perplexity vs diffusion NELBO on the same held-out rows (paired), and all validation curves on one figure;
5. SFT of AR, of the old conversion, of the default one and of the one with the smallest gap to AR (the SFT
   defaults);
   sentiment accuracy on held-out reviews, by decoding and by label likelihood;
--part all also runs
6. SFT of the default conversion with each SFT normalisation (LLaDA's, EOS padding down-weighted, one token mean
   over the batch) and as LLaDA 2.0 block SFT (block 32);
7. diffusion decoding quality against speed (steps, threshold) on the same questions;
8. DPO of the AR SFT model and of the default conversion's SFT model on the sample's preference pairs, 3 seeds,
   held-out accuracy before and after, and the spread of diffusion DPO's preference score under each variance
   lever (scripts/common/experiments/dpo.py).
--part dpo runs 8 alone (stage after stage, whatever --jobs), on the SFT checkpoints an earlier run left in
--out-dir or those of --dpo-starts (results_dpo.json).
--jobs N runs independent stages N at a time, one thread each (the numbers then match other --jobs N runs, not
necessarily --jobs 1 ones, bit for bit). Every number in the report comes from the commands this prints;
results.json keeps them all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from scripts.common.cli import Bounded, run_main
from scripts.common.experiments import in_parallel
from scripts.common.experiments.dpo import ROUTES as DPO_ROUTES
from scripts.common.experiments.dpo import DPOExperiment
from scripts.common.experiments.sft_objectives import ProtocolSettings, sft_protocol
from scripts.common.pipeline import SMALL_MODEL, cli, step

# AR-to-diffusion conversions: run name -> flags of scripts.train.diffusion --init-from-minimind (explicit,
# whatever the defaults). diffusion_from_ar is the conversion before logit shift existed.
CONVERSIONS = {
    "diffusion_from_ar": cli("--no-logit-shift", block_size=0),
    "a2d_shift": cli("--logit-shift", block_size=0),
    "a2d_shift_block32": cli("--logit-shift", block_size=32),
    "a2d_shift_block32_positional": cli("--logit-shift", block_size=32, position_masking=1),
    "a2d_shift_curriculum": cli(
        "--logit-shift", "--use-block-curriculum", mask_schedule="wsd", inference_block_size=32
    ),
}
DEFAULT_CONVERSION = "a2d_shift"  # what --init-from-minimind does without conversion flags (tested)

# Diffusion SFT variants: run name -> flags of scripts.train.train_sft_diffusion (explicit, whatever the defaults; the
# prompt read bidirectionally, as when 7.2 and 7.3 were run, before the prompt-causal default of 7.9).
SFT_VARIANTS = {
    "diffusion_sft_llada": cli("--no-prompt-causal", loss_normalization="row", eos_padding_weight=1.0),
    "diffusion_sft_padding01": cli("--no-prompt-causal", loss_normalization="row", eos_padding_weight=0.1),
    "diffusion_sft_token_mean": cli("--no-prompt-causal", loss_normalization="batch", eos_padding_weight=1.0),
}
DIFFUSION, SFT_DIFFUSION = "scripts.train.diffusion", "scripts.train.train_sft_diffusion"  # the entry points run most
DECODING_VARIANTS = {"steps4": cli(gen_steps=4), "steps2": cli(gen_steps=2), "threshold0.9": cli(threshold=0.9)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="weights/report")
    p.add_argument("--data-dir", default="dataset")
    p.add_argument("--steps", type=int, action=Bounded, low=1, default=500)
    p.add_argument("--sft-steps", type=int, action=Bounded, low=1, default=None, help="200; --part sft: 150")
    p.add_argument("--questions", type=int, action=Bounded, low=1, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dpo-steps", type=int, action=Bounded, low=1, default=100)
    p.add_argument("--dpo-starts", nargs=2, metavar=("AR", "DIFFUSION"), help="SFT checkpoints DPO starts from "
                   "(default: those of --part conversion in --out-dir)")  # fmt: skip
    p.add_argument("--part", choices=["all", "conversion", "dpo", "sft"], default="all")
    p.add_argument("--seeds", type=int, action=Bounded, low=1, default=5, help="--part sft: SFT seeds per objective")
    p.add_argument("--objectives", default=None, help="--part sft: comma-separated (default: all of sft_protocol's)")
    p.add_argument("--jobs", type=int, action=Bounded, low=1, default=1,
                   help="independent stages run this many at a time, one thread each")  # fmt: skip
    return p.parse_args(argv)


def timed_step(title: str, module: str, argv: list[str]):
    start = time.perf_counter()
    result = step(title, module, argv)
    return result, round(time.perf_counter() - start, 1)


class Experiment:
    """Runs stages in order, keeping each stage's result and wall time."""

    def __init__(self, args):
        self.args, self.out, self.data = args, Path(args.out_dir), Path(args.data_dir)
        self.results, self.timings = {}, {}
        self.best_sft = None  # the SFT variant with the best validation accuracy
        self.best_conversion = None  # the conversion with the smallest gap to AR

    def run(self, name: str, title: str, module: str, argv: list[str]):
        self.results[name], self.timings[name] = timed_step(title, module, argv)
        return self.results[name]

    def weights(self, run: str) -> str:
        return str(self.out / f"{run}_state_dict.pt")

    def run_many(self, stages: list[tuple[str, str, str, list[str]]]) -> None:
        """Independent stages (name, title, module, argv), --jobs at a time."""
        timed = in_parallel(timed_step, [stage[1:] for stage in stages], self.args.jobs)
        for (name, *_), (result, seconds) in zip(stages, timed):
            self.results[name], self.timings[name] = result, seconds

    def pretrain(self) -> None:
        a = self.args
        # fmt: off
        common = cli(data=self.data / "sample_pretrain.jsonl", tokenizer_dir=".", save_dir=self.out, **SMALL_MODEL,
                     device=a.device, seq_len=128, batch_size=16, max_iters=a.steps, warmup_steps=25,
                     learning_rate="2e-3", eval_interval=50, eval_batches=8, log_interval=10)
        # fmt: on
        self.run("ar", "1. AR pretraining", "scripts.train.train_pretrain", cli(*common, run_name="ar"))
        diffusion = cli("--train", "--use-tokenizer", *common, mask_schedule="iid_t", lr_schedule="cosine")
        stages = []
        for name, flags in CONVERSIONS.items():
            argv = cli(*diffusion, *flags, run_name=name, init_from_minimind=self.weights("ar"))
            stages.append((name, f"2. Diffusion initialised from AR: {name}", DIFFUSION, argv))
        scratch = cli(*diffusion, run_name="diffusion_scratch")
        stages.append(("diffusion_scratch", "3. Diffusion from scratch", DIFFUSION, scratch))
        self.run_many(stages)

    def compare(self) -> None:
        argv = cli(out=self.out / "compare", tokenizer_dir=".", seq_len=128, mc_samples=8, device=self.args.device)
        argv += cli(eval_data=self.data / "sample_pretrain_val.jsonl", eval_max_batches=8)
        for run in ("ar", *CONVERSIONS, "diffusion_scratch"):
            argv += cli(checkpoint=self.weights(run))
        self.run("compare", "4. AR perplexity vs diffusion NELBO, validation curves", "scripts.eval.compare", argv)

    def sft_flags(self) -> list[str]:
        a = self.args
        # fmt: off
        return cli(data=self.data / "sample_sft_train.jsonl", eval_data=self.data / "sample_sft_val.jsonl",
                   tokenizer_dir=".", save_dir=self.out, max_seq_len=256, batch_size=16, max_steps=a.sft_steps or 200,
                   learning_rate="1e-3", warmup_steps=20, eval_interval=50, eval_batches=8, device=a.device)
        # fmt: on

    def pick_conversion(self) -> str:
        """The conversion whose NELBO is closest to the AR model's on the held-out rows of the comparison."""
        gaps = {r["run"]: r["delta"] for r in self.results["compare"]["results"] if r["run"] in CONVERSIONS}
        best = min(gaps, key=gaps.get)
        print(f"gap to AR by conversion (nats/token): {gaps}; smallest: {best}")
        return best

    def finetune_conversions(self) -> None:
        """AR SFT, and the default diffusion SFT of the old, the default and the best conversion; test accuracy."""
        self.best_conversion = self.pick_conversion()
        starts = dict.fromkeys(["diffusion_from_ar", DEFAULT_CONVERSION, self.best_conversion])
        ar = cli(*self.sft_flags(), run_name="ar_sft", load_from=self.weights("ar"))
        stages = [("ar_sft", "5a. AR SFT", "scripts.train.train_sft_minimind", ar)]
        for start in starts:
            flags = SFT_VARIANTS["diffusion_sft_padding01"]
            argv = cli(*self.sft_flags(), *flags, run_name=f"sft_{start}", load_from=self.weights(start))
            stages.append((f"sft_{start}", f"5b. Diffusion SFT of {start}", SFT_DIFFUSION, argv))
        self.run_many(stages)
        checks = {"ar_sft": cli(minimind_checkpoint=self.weights("ar_sft"))}
        checks |= {f"sft_{start}": cli(diffusion_checkpoint=self.weights(f"sft_{start}")) for start in starts}
        stages = [self.accuracy_stage(f"accuracy_{run}", model, "--score-labels") for run, model in checks.items()]
        self.run_many(stages)

    def finetune(self) -> None:
        """Each SFT normalisation from the default conversion; block SFT with the one that decodes best."""
        start = self.weights(DEFAULT_CONVERSION)
        for name, flags in SFT_VARIANTS.items():
            argv = cli(*self.sft_flags(), *flags, run_name=name, load_from=start)
            self.run(name, f"6a. Diffusion SFT: {name}", SFT_DIFFUSION, argv)
        self.best_sft = self.select_sft()
        block = cli(*SFT_VARIANTS[self.best_sft], block_size=32)
        argv = cli(*self.sft_flags(), *block, run_name="diffusion_sft_block32", load_from=start)
        self.run("diffusion_sft_block32", "6b. Diffusion SFT as LLaDA 2.0 block SFT (block 32)", SFT_DIFFUSION, argv)

    def select_sft(self) -> str:
        """The variant that decodes best on the validation reviews (chosen there, reported on the test reviews)."""
        accuracy = {}
        for name in SFT_VARIANTS:
            checkpoint = cli(diffusion_checkpoint=self.weights(name))
            result = self.run(*self.accuracy_stage(f"validation_{name}", checkpoint, split="sample_sft_val.jsonl"))
            accuracy[name] = result["Diffusion"]["accuracy"]
        best = max(accuracy, key=accuracy.get)
        print(f"validation accuracy by SFT variant: {accuracy}; best: {best}")
        return best

    def accuracy_stage(self, name: str, checkpoints: list[str], *flags: str, split="sample_sft_test.jsonl"):
        argv = cli(*checkpoints, *flags, data=self.data / split, tokenizer_dir=".", limit=self.args.questions)
        argv += cli(batch_size=1, device=self.args.device)
        return name, f"accuracy: {name}", "scripts.eval.eval_sft_accuracy", argv

    def evaluate(self) -> None:
        stages = [
            self.accuracy_stage(f"accuracy_{name}", cli(diffusion_checkpoint=self.weights(name)), "--score-labels")
            for name in [*SFT_VARIANTS, "diffusion_sft_block32"]
        ]
        stages += [
            self.accuracy_stage(f"decoding_{label}", cli(diffusion_checkpoint=self.weights(self.best_sft)), *flags)
            for label, flags in DECODING_VARIANTS.items()
        ]
        self.run_many(stages)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.part == "sft":  # the diffusion SFT objectives, 5 seeds each (scripts/common/experiments/sft_objectives.py)
        return sft_protocol(ProtocolSettings.from_args(args))
    experiment = Experiment(args)
    if experiment.out.exists() and args.part != "dpo":  # --part dpo continues an earlier run's directory
        shutil.rmtree(experiment.out)
    experiment.out.mkdir(parents=True, exist_ok=True)
    experiment.run("sample", "0. Offline sample", "scripts.data.sample", cli(out_dir=experiment.data))
    if args.part != "dpo":
        experiment.pretrain()
        experiment.compare()
        experiment.finetune_conversions()
    if args.part == "all":
        experiment.finetune()
        experiment.evaluate()
    if args.part in ("all", "dpo"):
        starts = args.dpo_starts or [experiment.weights(run) for _, run, _ in DPO_ROUTES.values()]
        dpo = DPOExperiment(experiment.out, experiment.data, args.dpo_steps, args.questions, args.device,
                            dict(zip(DPO_ROUTES, starts)))  # fmt: skip
        experiment.results["dpo"] = dpo.run()
    summary = {
        "timings_s": experiment.timings,
        "best_conversion": experiment.best_conversion,
        "best_sft": experiment.best_sft,
        "results": experiment.results,
    }
    path = experiment.out / ("results_dpo.json" if args.part == "dpo" else "results.json")
    path.write_text(json.dumps(summary, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {path}; timings (s): {experiment.timings}")
    return summary


if __name__ == "__main__":
    run_main(main)
