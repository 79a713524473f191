"""Break the code on purpose, one change at a time, and check that the test named for the broken invariant fails.

    uv run python tests/deliberate_breaks.py            # every break
    uv run python tests/deliberate_breaks.py -k cache   # the breaks whose name contains "cache"

Each break is a textual edit of one source file in a scratch copy of the tracked tree (the working tree is never
touched) and the one test that must catch it, run alone: a break that only some neighbouring test catches is a
test that does not pin its invariant. The unbroken copy must pass the same tests first. technical_report.md
section 6 lists the table this prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Break:
    name: str
    path: str  # the file edited, relative to the repository root
    old: str  # text that must occur exactly once in it
    new: str
    test: str  # the pytest node id that must fail


BREAKS = [
    Break(
        "AR generation ignores the KV cache",
        "model/inference/ar.py",
        "cache = model.new_kv_cache(1, len(prompt_ids) + max_new_tokens) if use_cache else None",
        "cache = None",
        "tests/test_transformer.py::test_kv_cached_greedy_decoding_equals_uncached",
    ),
    Break(
        "cached positions restart at 0",
        "model/transformer.py",
        "cos, sin = self.rope_cos[past : past + T], self.rope_sin[past : past + T]",
        "cos, sin = self.rope_cos[:T], self.rope_sin[:T]",
        "tests/test_transformer.py::test_kv_cached_greedy_decoding_equals_uncached",
    ),
    Break(
        "block-causal cache cropped one column short",
        "model/inference/sampling.py",
        "                cache.crop(lo)\n",
        "                cache.crop(lo - 1)\n",
        "tests/test_block_diffusion.py::test_cached_and_uncached_block_decoding_give_identical_tokens",
    ),
    Break(
        "threshold fallback commits the least confident position",
        "model/inference/remasking.py",
        "commit |= commit_top(scores, open_here.any(1).long())",
        "commit |= commit_top(torch.where(open_here, -scores, float('-inf')), open_here.any(1).long())",
        "tests/test_diffusion.py::test_threshold_above_one_equals_one_token_per_step_low_confidence",
    ),
    Break(
        "threshold fallback commits the least confident position (batched)",
        "model/inference/remasking.py",
        "commit |= commit_top(scores, open_here.any(1).long())",
        "commit |= commit_top(torch.where(open_here, -scores, float('-inf')), open_here.any(1).long())",
        "tests/test_fast_decoding.py::test_threshold_above_one_with_a_batch_equals_one_token_per_step_low_confidence",
    ),
    Break(
        "training masks drawn from a process-local counter",
        "scripts/common/training/trainer.py",
        "        return seeded_generator(run.device, run.cfg.seed, k)\n",
        "        _train_rng.calls = getattr(_train_rng, 'calls', 0) + 1\n"
        "        return seeded_generator(run.device, run.cfg.seed, _train_rng.calls)\n",
        "tests/test_trainer.py::test_interrupted_and_resumed_equals_uninterrupted",
    ),
    Break(
        "the SFT loss masks and scores the prompt",
        "model/objectives/diffusion_loss.py",
        "pretraining_maskable(input_ids) if maskable is None else maskable",
        "pretraining_maskable(input_ids)",
        "tests/test_objective_expectations.py::test_sft_loss_trains_the_answer_only",
    ),
    Break(
        "the block loss ignores the block size (one block over the row)",
        "model/objectives/diffusion_loss.py",
        "partial(bdlm_forward, model, noisy, input_ids, objective.block_size, doc_ids)",
        "partial(bdlm_forward, model, noisy, input_ids, noisy.shape[1], doc_ids)",
        "tests/test_diffusion_loss.py::test_block_size_equal_to_the_row_is_the_bidirectional_loss",
    ),
    Break(
        "the DPO answer ELBO's weight 9 % low",
        "model/objectives/preference.py",
        "weights = sampling.schedule.elbo_weight(times.double())",
        "weights = 0.91 * sampling.schedule.elbo_weight(times.double())",
        "tests/test_dpo.py::test_the_diffusion_elbo_is_unbiased_under_uniform_logits",
    ),
    Break(
        "the DPO exact-count weight 9 % low",
        "model/objectives/preference.py",
        "weights = n.double() / counts.clamp(min=1)",
        "weights = 0.91 * n.double() / counts.clamp(min=1)",
        "tests/test_preference_terms.py::test_exact_count_draws_score_exactly_n_ln_v_under_uniform_logits_for_every_draw",
    ),
    Break(
        "the RPO term halved",
        "model/objectives/preference.py",
        "loss = (loss + terms.nll_weight * chosen_nll).mean()",
        "loss = (loss + terms.nll_weight * chosen_nll / 2).mean()",
        "tests/test_preference_terms.py::test_rpo_adds_the_chosen_answers_nll_per_token",
    ),
    Break(
        "DPO's chosen and rejected answers draw their own noise (pairing lost)",
        "model/objectives/preference.py",
        "return half.repeat_interleave(2, dim=1)",
        "return torch.rand(shape, device=device, generator=generator)",
        "tests/test_preference_terms.py::test_paired_draws_give_two_equal_answers_the_same_masks",
    ),
    Break(
        "the loss drops the 1/t weight and divides by the masked count (a self-normalised mean)",
        "model/objectives/diffusion_loss.py",
        "scored = nll * elbo * weights",
        "scored = nll * weights * total_weight / (masked * weights).sum()",
        "tests/test_objective_expectations.py::test_every_diffusion_estimator_has_the_nelbo_as_expectation_for_a_non_uniform_model",
    ),
    Break(
        "eval_lm's AR figure 4 % high",
        "scripts/common/evaluation/lm_scores.py",
        "sums.append(ar_nll_rows(model, batch, scored).cpu())",
        "sums.append(1.04 * ar_nll_rows(model, batch, scored).cpu())",
        "tests/test_eval_lm.py::test_eval_lm_scores_both_routes_on_the_same_rows",
    ),
    Break(
        "the speed card's pair compares the hidden size alone",
        "model/config.py",
        "        for name in ARCHITECTURE_FIELDS\n",
        "        for name in ARCHITECTURE_FIELDS[:1]\n",
        "tests/test_speed_card.py::test_a_pair_holds_models_of_the_same_shape",
    ),
    Break(
        "training FLOPs count the key/value projections at full width",
        "scripts/common/bench/training.py",
        "2 * h * h + 2 * h * kv + 3 * h * i",
        "2 * h * h + 2 * h * h + 3 * h * i",
        "tests/test_bench.py::test_training_flops_follow_six_n_plus_attention",
    ),
    Break(
        "guidance mixed with w instead of w + 1",
        "model/inference/reference_sampler.py",
        "return uncond + (cfg_scale + 1) * (cond - uncond)",
        "return uncond + cfg_scale * (cond - uncond)",
        "tests/test_diffusion.py::test_guidance_is_the_unconditional_plus_w_plus_one_times_the_difference",
    ),
    Break(
        "SIGTERM left to its default (the process dies unsaved)",
        "scripts/common/cli.py",
        "previous = signal.signal(signal.SIGTERM, _raise_terminated)",
        "previous = signal.getsignal(signal.SIGTERM)",
        "tests/test_reliability_training.py::test_sigterm_saves_a_resumable_checkpoint_and_says_so",
    ),
    Break(
        "prompt-causal SFT scores the first answer token only when its draw masks it",
        "model/objectives/diffusion_loss.py",
        "masked, elbo = exact_first_token(answer_start, masked, elbo * objective.denoising_weight)",
        "elbo = elbo * objective.denoising_weight",
        "tests/test_prompt_causal.py::test_a_one_token_answer_is_scored_exactly_on_every_draw",
    ),
    Break(
        "the prompt cache reads the prompt bidirectionally",
        "model/inference/prompt_cache.py",
        'logits = run.forward(ids, attention="causal", kv_cache=self.cache)',
        'logits = run.forward(ids, attention="bidirectional", kv_cache=self.cache)',
        "tests/test_prompt_causal.py::test_the_prompt_cache_decodes_the_reference_tokens",
    ),
    Break(
        "the likelihoods score the first answer token only when their draw masks it",
        "model/objectives/diffusion_loss.py",
        "masked, weights = exact_first_token(answer_start, masked, weights)",
        "pass",
        "tests/test_prompt_causal.py::test_the_likelihood_scores_the_first_answer_token_exactly_and_stays_unbiased",
    ),
]


def run_test(tree: Path, test: str) -> bool:
    """Whether `test` passes in `tree` (one process, one thread: the machine is shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test]
    return subprocess.run(command, cwd=tree, env=env, capture_output=True).returncode == 0


def copy_tree(into: Path, tests_from: str | None) -> Path:
    """The tracked files of the repository (plus the shared fixtures' relative location) copied under `into`;
    with `tests_from`, tests/ as it was at that git revision (to show what the older tests missed)."""
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = into / ROOT.name
    for name in files:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    if tests_from:
        shutil.rmtree(tree / "tests")
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    if (ROOT.parent / "shared").exists():
        (into / "shared").symlink_to(ROOT.parent / "shared")
    return tree


def check(tree: Path, brk: Break) -> str:
    """'caught', or why not: the edit must apply and the unbroken test must pass, then fail once broken."""
    source = tree / brk.path
    original = source.read_text(encoding="utf-8")
    if original.count(brk.old) != 1:
        return f"edit does not apply ({original.count(brk.old)} matches)"
    if not run_test(tree, brk.test):
        return "fails unbroken (or no such test)"
    try:
        source.write_text(original.replace(brk.old, brk.new), encoding="utf-8")
        return "MISSED" if run_test(tree, brk.test) else "caught"
    finally:
        source.write_text(original, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="only the breaks whose name contains this text")
    parser.add_argument("--tests-from", metavar="REV", help="run the tests as they were at this git revision")
    args = parser.parse_args()
    chosen = [b for b in BREAKS if args.k in b.name]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="breaks-") as scratch:
        tree = copy_tree(Path(scratch), args.tests_from)
        print("| break | test that catches it | outcome |\n|---|---|---|")
        for brk in chosen:
            outcomes.append(check(tree, brk))
            print(f"| {brk.name} (`{brk.path}`) | `{brk.test.split('::')[1]}` | {outcomes[-1]} |", flush=True)
    caught = outcomes.count("caught")
    print(f"{caught} of {len(chosen)} breaks caught by the test named for their invariant")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
