"""DPO for both routes: ln 2 and zero rewards at initialisation, the antithetic
score exactly 0 at initialisation, a few steps raising preference accuracy, bad rows as one-line errors."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODEL, UniformModel

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.errors import NanoLladaError
from model.inference.likelihood import ar_log_likelihood_batch
from model.objectives.preference import (
    DPOObjective,
    ElboSampling,
    PreferenceLoss,
    ar_answer_log_likelihood,
    ar_scorer,
    diffusion_answer_elbo,
    diffusion_scorer,
    draw_answer_masks,
    pair_log_likelihoods,
    preference_score_spread,
)
from model.objectives.schedule import LINEAR, NoiseSchedule
from model.tokenizer import load_tokenizer, mask_token_id, tokenizer_identity
from model.transformer import Transformer
from scripts.common.data.pairs import collate_pairs, load_pairs
from scripts.common.pipeline import cli
from scripts.train import train_dpo_diffusion, train_dpo_minimind

LABELS = ("好", "坏")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(".")


def toy_pairs(path, count: int = 16, prompt_of=lambda i: f"第{i}个问题：这个东西怎么样？"):
    """A toy preference set: the chosen answer is always the same word, the rejected one the other."""
    rows = []
    for i in range(count):
        question = [{"role": "user", "content": prompt_of(i)}]
        rows.append(
            {
                "chosen": question + [{"role": "assistant", "content": LABELS[0]}],
                "rejected": question + [{"role": "assistant", "content": LABELS[1] * (1 + i % 3)}],
            }
        )
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def tiny_model(tokenizer, route: str) -> Transformer:
    config = ModelConfig(**TINY_MODEL, vocab_size=len(tokenizer), logit_shift=route == "diffusion")
    return Transformer(config)


@pytest.fixture(scope="module")
def batch(tokenizer, tmp_path_factory):
    path = toy_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", count=4)
    return collate_pairs(load_pairs(path, tokenizer, 64), range(4))


def test_ar_answer_log_likelihood_is_the_exact_one_of_the_answer_alone(tokenizer, batch):
    model = tiny_model(tokenizer, "ar").eval()
    rows = {key: value.flatten(0, 1) for key, value in batch.items()}
    scores = ar_answer_log_likelihood(model, rows["input_ids"], rows["answer"])
    for row, score in enumerate(scores.tolist()):
        ids, answer = rows["input_ids"][row], rows["answer"][row]
        start, end = int(answer.nonzero()[0]), int(rows["length"][row])
        exact = ar_log_likelihood_batch(model, ids[:start].tolist(), [ids[start:end].tolist()])[0]
        assert score == pytest.approx(exact, abs=1e-4)
    # and the DPO loss of the AR route is the closed form of those log-likelihoods
    reference = tiny_model(tokenizer, "ar").eval()
    loss, _ = DPOObjective(reference, ar_scorer(), PreferenceLoss(beta=0.2, nll_weight=0))(model, batch, None)
    with torch.no_grad():
        ratio = (scores - ar_answer_log_likelihood(reference, rows["input_ids"], rows["answer"])).view(-1, 2)
    expected = torch.log1p(torch.exp(-0.2 * (ratio[:, 0] - ratio[:, 1]))).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def objective_at_init(tokenizer, route: str, block_size=None):
    policy = tiny_model(tokenizer, route)
    scorer = ar_scorer() if route == "ar" else diffusion_scorer(mask_token_id(tokenizer), block_size)
    sampling = None if route == "ar" else ElboSampling(samples=4)
    objective = DPOObjective(
        copy.deepcopy(policy).requires_grad_(False), scorer, PreferenceLoss(nll_weight=0), sampling
    )
    return objective, policy


@pytest.mark.parametrize("route,block_size", [("ar", None), ("diffusion", None), ("diffusion", 8)])
def test_at_initialisation_the_loss_is_ln2_and_the_rewards_are_zero(tokenizer, batch, route, block_size):
    objective, policy = objective_at_init(tokenizer, route, block_size=block_size)
    loss, stats = objective(policy, batch, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_chosen"] == stats["reward_rejected"] == stats["reward_margin"] == 0.0
    assert stats["accuracy"] == 0.5
    loss.backward()  # the policy gets a gradient, the frozen reference none
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
    assert all(p.grad is None for p in objective.reference.parameters())


def test_antithetic_score_is_exactly_zero_at_initialisation_for_every_draw(tokenizer, batch):
    objective, policy = objective_at_init(tokenizer, "diffusion")
    for seed in range(8):
        policy_ll, reference_ll = pair_log_likelihoods(
            policy,
            objective.reference,
            batch,
            objective.scorer,
            objective.sampling,
            torch.Generator().manual_seed(seed),
        )
        assert torch.equal(policy_ll.detach(), reference_ll) and policy_ll.abs().max() > 0
    assert preference_score_spread(objective, policy, batch, redraws=8) == 0.0
    independent = DPOObjective(
        objective.reference, objective.scorer, objective.terms, ElboSampling(samples=4, antithetic=False)
    )
    assert preference_score_spread(independent, policy, batch, redraws=8) > 0.1


def test_the_diffusion_elbo_is_unbiased_under_uniform_logits():
    """Uniform logits: log p(answer | prompt) = -n ln|V| exactly; the Bernoulli draws' mean estimates it without
    bias (the exact-count draws hit it on every draw: tests/test_preference_terms.py)."""
    input_ids = torch.randint(3, 100, (3, 10))
    length = torch.tensor([10, 8, 6])
    answer = torch.zeros(3, 10, dtype=torch.bool)
    for row, (start, end) in enumerate([(4, 10), (6, 8), (5, 6)]):
        answer[row, start:end] = True
    with pytest.raises(NanoLladaError, match="the exact-count draw takes no time"):
        ElboSampling(schedule=NoiseSchedule("cosine"))  # its weight n / l holds for every schedule
    for distinct_times, schedule in ((True, LINEAR), (False, LINEAR), (True, NoiseSchedule("cosine"))):
        sampling = ElboSampling(4000, distinct_times, estimator="bernoulli", paired=False, schedule=schedule)
        draws = draw_answer_masks(answer, sampling, torch.Generator().manual_seed(0))
        assert not (draws.masked & ~answer).any()
        estimate = diffusion_answer_elbo(UniformModel(101), input_ids, length, draws, 100)
        # Under uniform logits a draw scores (masked count) x weight x ln|V|: the estimate is their mean, and that
        # mean sits within four standard errors of -n ln|V| (pooled over rows, the error is about 1.3 %).
        per_draw = -(draws.masked * draws.weights).sum(-1).double() * math.log(101)  # [S, R]
        assert torch.allclose(estimate.double(), per_draw.mean(0), rtol=1e-5)
        pooled, truth = per_draw.sum(1), -answer.sum().double() * math.log(101)
        assert abs(pooled.mean() - truth) < 4 * pooled.std() / math.sqrt(pooled.numel())


def write_checkpoint(tokenizer, route: str, path):
    torch.manual_seed(0)
    model = tiny_model(tokenizer, route)
    save_checkpoint(path, route, model.config, model, tokenizer_identity(tokenizer), step=0)
    return path


@pytest.mark.parametrize("route", ["ar", "diffusion"])
def test_a_few_steps_raise_preference_accuracy_on_a_toy_set(tokenizer, tmp_path, route):
    pairs = toy_pairs(tmp_path / "pairs.jsonl")
    start = write_checkpoint(tokenizer, route, tmp_path / "start.pt")
    entry = train_dpo_minimind if route == "ar" else train_dpo_diffusion
    argv = cli(data=pairs, eval_data=pairs, tokenizer_dir=".", load_from=start, save_dir=tmp_path, run_name="dpo")
    argv += cli(batch_size=4, max_steps=12, learning_rate="3e-3", warmup_steps=2, eval_interval=6, device="cpu")
    summary = entry.main([*argv, "--eval-batches", "4", *(["--elbo-samples", "2"] if route != "ar" else [])])
    records = [json.loads(line) for line in (tmp_path / "dpo_metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_accuracy"] for r in records if "val_accuracy" in r]
    assert accuracy[0] == 0.5 and accuracy[-1] >= 0.9 and summary["validation"]["val_accuracy"] == accuracy[-1]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"} <= set(steps[0])
    assert (tmp_path / "dpo_loss.png").exists() and (tmp_path / "dpo_state_dict.pt").exists()


BAD_ROWS = [
    ({"chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]}, "no field 'rejected'"),
    ({"chosen": [{"role": "user", "content": "问"}], "rejected": []}, "no assistant turn.*'chosen'"),
    (
        {
            "chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
            "rejected": [{"role": "user", "content": "别的问题"}, {"role": "assistant", "content": "答"}],
        },
        "different prompts",
    ),
    (
        {
            "chosen": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}],
            "rejected": [
                {"role": "user", "content": "问"},
                {"role": "assistant", "content": "答"},
                {"role": "user", "content": "再问"},
            ],
        },
        "'rejected' must end with the assistant answer",
    ),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_are_one_line_errors_with_file_and_line(tokenizer, tmp_path, row, message):
    path = toy_pairs(tmp_path / "pairs.jsonl", count=2)
    path.write_text(path.read_text(encoding="utf-8") + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(NanoLladaError, match=f"{path}:3: .*{message}"):
        load_pairs(path, tokenizer, 64)


def test_bad_row_through_the_entry_point_is_one_line_and_exit_2(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(BAD_ROWS[1][0], ensure_ascii=False) + "\n", encoding="utf-8")
    start = write_checkpoint(tokenizer, "ar", tmp_path / "start.pt")
    argv = cli(data=path, tokenizer_dir=".", load_from=start, save_dir=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.train.train_dpo_minimind", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and f"{path}:1: " in proc.stderr


def test_the_dpo_experiment_runs_parse_with_their_entry_points():
    import importlib

    from scripts.common.experiments import dpo as dpo_experiment

    for route, (module, _, _) in dpo_experiment.ROUTES.items():
        control = dpo_experiment.CONTROL if route == "ar" else []
        flags = cli(*control, data="pairs.jsonl", load_from="sft.pt", seed=1, **dpo_experiment.DPO_TRAINING)
        args = importlib.import_module(module).parse_args(flags)
        assert args.beta == 0.1 and args.batch_size == dpo_experiment.DPO_TRAINING["batch_size"] and args.seed == 1
        assert args.nll_weight == (0 if control else PreferenceLoss().nll_weight)


def test_the_dpo_experiment_summary_has_a_row_per_seed_and_the_mean_lift():
    from scripts.common.experiments.dpo import mean_and_stderr, summary_table

    validation = {"val_chosen_drift": -0.1, "val_rejected_drift": -2.0, "val_accuracy": 0.7}
    sft = {"questions": 200, "accuracy": 0.70, "unparseable": 0, "likelihood_accuracy": 0.70}
    runs = [{**sft, "seed": s, "accuracy": 0.70 + d, "validation": validation} for s, d in enumerate([0.02, 0.04])]
    results = {route: {"sft": sft, "dpo": runs} for route in ("ar", "diffusion")}
    table = summary_table(results)
    assert table.count("+ DPO, seed") == 4 and table.count("+0.030 ± 0.010") == 2
    assert mean_and_stderr([1.0, 3.0]) == (2.0, 1.0)


def test_own_answer_pairs_are_balanced_by_the_chosen_label():
    from scripts.common.experiments.dpo import balancing_pairs, chosen_answer

    def pair(chosen: str, rejected: str) -> str:
        question = [{"role": "user", "content": "问"}]
        return json.dumps({"chosen": question + [{"role": "assistant", "content": chosen}],
                           "rejected": question + [{"role": "assistant", "content": rejected}]})  # fmt: skip

    own = [pair("正面", "负面")] * 3 + [pair("负面", "正面")]
    pool = [pair("正面", "负面")] * 5 + [pair("负面", "正面")] * 5
    picked = balancing_pairs(own, pool)
    assert len(picked) == 4 and [chosen_answer(line) for line in own + picked].count("正面") == 4
