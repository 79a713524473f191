"""The DPO experiment of technical_report.md 7.5, run by `scripts.report_experiments --part dpo`: each route's SFT
model (trained once) and its DPO runs, one per seed, every flag at its default but the tiny model's learning rate,
judged on held-out test reviews before and after, by decoding and by label likelihood; the drift of the validation
pairs' chosen and rejected answers against the reference; plain DPO (no NLL term) on the AR route as the control;
the spread of the diffusion preference score under each variance lever (scripts.eval.dpo_variance); and, on the AR
route, DPO on pairs whose rejected answer is the SFT model's own wrong answer to a train question, next to as many
gold-vs-other pairs picked so that each label is chosen as often (scripts.data.sample --dpo-answers).

Stages run one after another in this process (one thread: run it with OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import NanoLladaError
from scripts.common.pipeline import cli, step

# route -> (DPO entry point, the run of --part conversion whose SFT model it starts from, the accuracy flag)
ROUTES = {
    "ar": ("scripts.train.train_dpo_minimind", "ar_sft", "minimind_checkpoint"),
    "diffusion": ("scripts.train.train_dpo_diffusion", "sft_a2d_shift", "diffusion_checkpoint"),
}
SEEDS = (0, 1, 2)
# The tiny model's learning rate; the entry points' default (5e-7) is MiniMind's, for its dpo.jsonl. Every other
# DPO flag keeps its default.
DPO_TRAINING = dict(
    max_seq_len=256, batch_size=8, learning_rate="5e-4", warmup_steps=10, eval_interval=25, eval_batches=4
)
CONTROL = cli(nll_weight=0, max_chosen_drop=0)  # plain DPO, never stopped: the displacement the defaults prevent
LIKELIHOOD_DRAWS = 8  # diffusion: exact-count mask draws per label for the label choice
OWN_ANSWER_QUESTIONS = 2000  # train questions the SFT model answers for the own-answer pairs
VARIANCE = dict(pairs=8, elbo_samples=4, redraws=64, max_seq_len=256)  # n of the levers; both defaults are rows too


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.fmean(values), stderr


def last_validation(metrics: Path) -> dict:
    """The last validation line of a DPO run's metrics jsonl."""
    lines = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    return next(line for line in reversed(lines) if "val_chosen_drift" in line)


@dataclass
class DPOExperiment:
    out: Path
    data: Path
    steps: int
    questions: int
    device: str
    starts: dict  # route -> SFT checkpoint
    results: dict = field(default_factory=dict)

    def accuracy(self, route: str, weights: Path | str) -> dict:
        argv = cli("--score-labels", data=self.data / "sample_sft_test.jsonl", tokenizer_dir=".",
                   limit=self.questions, batch_size=1, mc_samples=LIKELIHOOD_DRAWS, device=self.device,
                   **{ROUTES[route][2]: weights})  # fmt: skip
        result = step(f"accuracy of {weights}", "scripts.eval.eval_sft_accuracy", argv)
        return next(iter(result.values()))

    def train(self, run: str, route: str, seed: int, *extra: str, data: Path | None = None) -> dict:
        """One DPO run and the accuracy of its model; a run the stop line ends is recorded as stopped."""
        for old in self.out.glob(f"{run}[._]*"):  # a rerun trains afresh
            old.unlink()
        data = data or self.data / "sample_dpo_train.jsonl"
        argv = cli(*extra, data=data, eval_data=self.data / "sample_dpo_val.jsonl",
                   tokenizer_dir=".", save_dir=self.out, run_name=run, load_from=self.starts[route],
                   max_steps=self.steps, seed=seed, device=self.device, **DPO_TRAINING)  # fmt: skip
        try:
            step(f"DPO {run}", ROUTES[route][0], argv)
        except NanoLladaError as err:
            print(err)
            return {"seed": seed, "stopped": str(err), "validation": last_validation(self.out / f"{run}_metrics.jsonl")}
        validation = last_validation(self.out / f"{run}_metrics.jsonl")
        return {"seed": seed, "validation": validation, **self.accuracy(route, self.out / f"{run}_state_dict.pt")}

    def run(self) -> dict:
        for start in self.starts.values():
            if not Path(start).exists():
                raise NanoLladaError(f"{start} not found: DPO starts from the SFT models of --part conversion")
        for route in ROUTES:
            self.results[route] = {
                "sft": self.accuracy(route, self.starts[route]),
                "dpo": [self.train(f"{route}_dpo_seed{seed}", route, seed) for seed in SEEDS],
            }
        argv = cli(policy=self.out / "diffusion_dpo_seed0_state_dict.pt", reference=self.starts["diffusion"],
                   tokenizer_dir=".", data=self.data / "sample_dpo_val.jsonl", device=self.device,
                   **VARIANCE)  # fmt: skip
        self.results["variance"] = step("Spread of the diffusion preference score", "scripts.eval.dpo_variance", argv)
        self.results["ar"]["plain_dpo"] = self.train("ar_plain_dpo", "ar", SEEDS[0], *CONTROL)
        self.results["ar"]["own_answers"] = self.train("ar_own_dpo", "ar", SEEDS[0], data=self.own_answer_pairs("ar"))
        print(summary_table(self.results))
        return self.results

    def own_answer_pairs(self, route: str) -> Path:
        """The SFT model's own wrong answers to the first OWN_ANSWER_QUESTIONS train questions as rejected answers,
        each pair next to a gold-vs-other pair of the training file (in its order): the jsonl DPO then reads."""
        predictions, folder = self.out / f"{route}_train_predictions.jsonl", self.out / f"{route}_own_pairs"
        model = {ROUTES[route][2]: self.starts[route]}
        argv = cli(data=self.data / "sample_sft_train.jsonl", tokenizer_dir=".", limit=OWN_ANSWER_QUESTIONS,
                   batch_size=1, out=predictions, device=self.device, **model)  # fmt: skip
        step(f"{route} SFT answers to train questions", "scripts.eval.eval_sft_accuracy", argv)
        step("own-answer pairs", "scripts.data.sample", cli(out_dir=folder, dpo_answers=predictions))
        own = (folder / "sample_dpo_own.jsonl").read_text(encoding="utf-8").splitlines()
        other = balancing_pairs(own, (self.data / "sample_dpo_train.jsonl").read_text(encoding="utf-8").splitlines())
        mixed = self.out / f"{route}_own_and_other_pairs.jsonl"
        mixed.write_text("".join(line + "\n" for line in own + other), encoding="utf-8")
        print(f"{mixed}: {len(own)} own-answer pairs and {len(other)} gold-vs-other pairs")
        return mixed


def chosen_answer(line: str) -> str:
    return json.loads(line)["chosen"][-1]["content"]


def balancing_pairs(own: list[str], pool: list[str]) -> list[str]:
    """len(own) pairs of the pool, each one whose chosen answer is the least chosen so far (in the pool's order
    within an answer): a biased model's wrong answers lean one way (an SFT model that over-answers one label is
    wrong mostly on the other), and DPO on them alone would learn to flip the label prior."""
    by_answer = {}
    for line in pool:
        by_answer.setdefault(chosen_answer(line), []).append(line)
    counts = {answer: sum(chosen_answer(line) == answer for line in own) for answer in by_answer}
    taken = dict.fromkeys(by_answer, 0)
    picked = []
    while len(picked) < len(own) and any(taken[a] < len(lines) for a, lines in by_answer.items()):
        answer = min((a for a in by_answer if taken[a] < len(by_answer[a])), key=counts.__getitem__)
        picked.append(by_answer[answer][taken[answer]])
        taken[answer] += 1
        counts[answer] += 1
    return picked


def row(name: str, before: dict, after: dict) -> str:
    validation = after["validation"]
    if "stopped" in after:
        return f"| {name} | stopped: {after['stopped']} | | | {validation['val_chosen_drift']:.2f} | |"
    return (
        f"| {name} | {after['accuracy']:.3f} ({after['unparseable']}) | {after['likelihood_accuracy']:.3f} | "
        f"{after['accuracy'] - before['accuracy']:+.3f} | {validation['val_chosen_drift']:.2f} / "
        f"{validation['val_rejected_drift']:.2f} | {validation['val_accuracy']:.3f} |"
    )


def summary_table(results: dict) -> str:
    """Markdown: per route the SFT model, each seed's DPO model and the mean lift over the seeds."""
    lines = [
        f"| model ({results['ar']['sft']['questions']} held-out test reviews) | decoded (unparseable) | by likelihood "
        "| decoded lift | val chosen / rejected drift (nats) | val preference accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for route in ROUTES:
        before, runs = results[route]["sft"], results[route]["dpo"]
        lines.append(
            f"| {route} SFT | {before['accuracy']:.3f} ({before['unparseable']}) | "
            f"{before['likelihood_accuracy']:.3f} | | | |"
        )
        lines += [row(f"{route} + DPO, seed {run['seed']}", before, run) for run in runs]
        done = [run for run in runs if "stopped" not in run]
        if done:
            lift = mean_and_stderr([run["accuracy"] - before["accuracy"] for run in done])
            likelihood = mean_and_stderr([run["likelihood_accuracy"] - before["likelihood_accuracy"] for run in done])
            lines.append(
                f"| {route}: mean lift over {len(done)} seeds (± s.e.) | | {likelihood[0]:+.3f} ± {likelihood[1]:.3f} "
                f"| {lift[0]:+.3f} ± {lift[1]:.3f} | | |"
            )
        if "plain_dpo" in results[route]:
            lines.append(row(f"{route} + plain DPO (--nll-weight 0), seed 0", before, results[route]["plain_dpo"]))
        if "own_answers" in results[route]:
            lines.append(row(f"{route} + DPO on own-answer pairs, seed 0", before, results[route]["own_answers"]))
    return "\n".join(lines)
