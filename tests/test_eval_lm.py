"""Held-out LM evaluation: per-row NELBO terms and AR NLL, their standard errors, and eval_lm on the same rows."""

import functools
import json
import math

import pytest
import torch
from conftest import ROOT, UniformModel

from model.checkpoint import save_checkpoint
from model.config import ModelConfig, preset
from model.errors import NanoLladaError
from model.inference.likelihood import ar_nll_rows, diffusion_nelbo, diffusion_nelbo_rows, diffusion_nelbo_terms
from model.objectives.ar_loss import next_token_loss
from model.tokenizer import load_tokenizer, tokenizer_identity
from model.transformer import Transformer
from scripts.common.evaluation.lm_scores import ratio_mean_and_stderr, scored_positions
from scripts.common.evaluation.loading import HeldOutRows, load_any_kind
from scripts.eval import eval_lm

V, MASK = 101, 100
SENTENCES = [
    "今天天气很好，我们一起去公园散步。",
    "他在图书馆里读了一下午的书。",
    "春天来了，河边的柳树发芽了。",
    "老师说明天要考试，大家都在复习。",
    "这家店的咖啡味道不错，价格也合适。",
]


@functools.lru_cache(maxsize=1)
def repo_tokenizer():
    return load_tokenizer(ROOT)


def tiny_eval_config() -> ModelConfig:
    """Tiny, but with the repo tokenizer's vocabulary, so the entry points can load it with --tokenizer-dir."""
    return preset("tiny", vocab_size=len(repo_tokenizer()), max_position_embeddings=128, tie_word_embeddings=False)


def micro_model() -> Transformer:
    """One layer of width 32 over the V-token vocabulary, in eval mode."""
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    return Transformer(ModelConfig(**shape, vocab_size=V, max_position_embeddings=64)).eval()


def save_tiny(path, kind: str, model: Transformer | None = None, **extra):
    """Save a (random, seeded) tiny model as a checkpoint of `kind` with the repo tokenizer's identity."""
    if model is None:
        torch.manual_seed(0)
        model = Transformer(tiny_eval_config())
    save_checkpoint(path, kind, model.config, model, tokenizer_identity(repo_tokenizer()), **extra)
    return str(path)


def write_corpus(path, documents: int = 40):
    path.write_text(
        "".join(
            json.dumps({"text": SENTENCES[i % len(SENTENCES)] * (1 + i % 3)}, ensure_ascii=False) + "\n"
            for i in range(documents)
        ),
        encoding="utf-8",
    )
    return str(path)


def test_nelbo_terms_match_diffusion_nelbo_and_never_mask_the_context():
    ids = torch.randint(1, MASK, (6, 24), generator=torch.Generator().manual_seed(0))
    model = micro_model()
    terms = diffusion_nelbo_terms(model, ids, MASK, 5, torch.Generator().manual_seed(3))
    mean, stderr = diffusion_nelbo(model, ids, MASK, 5, torch.Generator().manual_seed(3))
    per_draw = terms.sum(1) / ids.numel()
    assert terms.shape == (5, 6) and mean == pytest.approx(per_draw.mean().item(), rel=1e-9)
    assert stderr == pytest.approx(per_draw.std().item() / math.sqrt(5), rel=1e-9)
    spy = UniformModel()
    scored = scored_positions(ids)
    uniform_terms = diffusion_nelbo_terms(spy, ids, MASK, 20, torch.Generator().manual_seed(1), maskable=scored)
    assert all((x[:, 0] == ids[:, 0]).all() for x in spy.inputs)  # the context token is never masked
    masked_counts = torch.stack([(x == MASK).sum(1) for x in spy.inputs]).double()
    assert ((uniform_terms == 0) == (masked_counts == 0)).all() and (masked_counts > 0).any()
    # Uniform logits: each term is (masked count) * ln V / t, an unbiased estimate of 23 ln V (within 4 errors).
    assert (uniform_terms >= masked_counts * math.log(V) - 1e-6).all()  # the weight 1/t is at least 1
    error = uniform_terms.std() / math.sqrt(uniform_terms.numel())
    assert abs(uniform_terms.mean().item() - 23 * math.log(V)) < 4 * error


def test_exact_count_nelbo_rows_are_exact_for_uniform_logits_and_seeded():
    ids = torch.randint(1, MASK, (5, 20), generator=torch.Generator().manual_seed(0))
    ids[4, 12:] = 0  # a PAD tail: never scored, never masked
    scored = scored_positions(ids)
    spy = UniformModel()
    terms = diffusion_nelbo_rows(spy, ids, scored, MASK, 7, torch.Generator().manual_seed(2))
    n = scored.sum(1).double()
    assert torch.allclose(terms, (n * math.log(V)).expand(7, -1))  # -A ln|V| invariant, every draw
    for x in spy.inputs:
        masked = x == MASK
        assert not (masked & ~scored).any() and (masked.sum(1) >= 1).all()
    counts = torch.stack([(x == MASK).sum(1) for x in spy.inputs])  # [draws, rows]
    assert counts[:, 0].unique().numel() == 7  # stratified: 7 draws spread over 1..19
    model = micro_model()
    first = diffusion_nelbo_rows(model, ids, scored, MASK, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, diffusion_nelbo_rows(model, ids, scored, MASK, 3, torch.Generator().manual_seed(5)))
    one = torch.zeros_like(scored)
    one[:, 7] = True  # one scored token: the estimate is exact, -log p(x_7 | rest) with x_7 masked
    exact = torch.log_softmax(model(ids.masked_fill(one, MASK), attention="bidirectional")[:, 7], -1).gather(
        1, ids[:, 7:8]
    )
    assert torch.allclose(
        diffusion_nelbo_rows(model, ids, one, MASK, 2, torch.Generator())[0], -exact.squeeze(1).double(), atol=1e-5
    )


def test_ar_rows_are_exact_next_token_sums():
    ids = torch.randint(1, MASK, (3, 16), generator=torch.Generator().manual_seed(0))
    model = micro_model()
    rows = ar_nll_rows(model, ids, scored_positions(ids))
    assert rows.sum().item() / (3 * 15) == pytest.approx(next_token_loss(model, ids).item(), rel=1e-5)
    uniform = ar_nll_rows(UniformModel(), ids, scored_positions(ids))
    assert torch.allclose(uniform, torch.full((3,), 15 * math.log(V), dtype=torch.float64))
    with pytest.raises(ValueError):
        ar_nll_rows(model, ids, torch.ones_like(ids, dtype=torch.bool))


def test_ratio_stderr_is_the_row_stderr_for_equal_rows():
    sums, tokens = torch.tensor([10.0, 12.0, 11.0, 15.0]), torch.full((4,), 5.0)
    mean, stderr = ratio_mean_and_stderr(sums, tokens)
    assert mean == pytest.approx(48 / 20) and stderr == pytest.approx((sums / 5).std().item() / 2)


def test_eval_lm_scores_both_routes_on_the_same_rows(tmp_path, capsys):
    ar = save_tiny(tmp_path / "ar.pt", "ar")
    diffusion = save_tiny(tmp_path / "diffusion.pt", "diffusion")
    data = write_corpus(tmp_path / "val.jsonl")
    args = [
        "--tokenizer-dir",
        str(ROOT),
        "--eval-data",
        data,
        "--seq-len",
        "32",
        "--eval-batch-size",
        "4",
        "--eval-max-batches",
        "2",
        "--mc-samples",
        "3",
        "--device",
        "cpu",
        "--json-out",
        str(tmp_path / "lm.json"),
    ]
    results = eval_lm.main(["--checkpoint", ar, "--checkpoint", diffusion, "--checkpoint", ar, *args])
    first, second, again = results
    assert (first["kind"], second["kind"]) == ("ar", "diffusion")
    assert first["rows"] == second["rows"] == 8 and first["tokens"] == second["tokens"] == 8 * 31
    assert first["row_tokens"] == second["row_tokens"]
    assert first["stderr"] > 0 and first["mc_stderr"] == 0 and second["stderr"] > 0 and second["mc_stderr"] > 0
    # AR: exactly the mean next-token loss over the same rows (every row scores its seq_len - 1 predictions).
    model, tokenizer, _, _ = load_any_kind(ar, ".", torch.device("cpu"))
    batches = HeldOutRows(data, "text", 32, 4, 2).batches(tokenizer)
    with torch.no_grad():
        exact = sum(next_token_loss(model, batch).item() for batch in batches) / len(batches)
    assert first["nll_per_token"] == pytest.approx(exact, rel=1e-5)
    # Diffusion: an untrained model is near uniform, and the NELBO bounds the NLL from above.
    assert second["nll_per_token"] == pytest.approx(math.log(len(repo_tokenizer())), rel=0.05)
    assert again["delta"] == 0 and again["delta_stderr"] == 0
    table = capsys.readouterr().out
    assert "NELBO (3 draws)" in table and "| ar |" in table and "| diffusion |" in table
    assert len(json.loads((tmp_path / "lm.json").read_text())["results"]) == 3


def test_eval_lm_errors_name_the_file(tmp_path):
    data = write_corpus(tmp_path / "val.jsonl")
    with pytest.raises(NanoLladaError, match="missing.pt: checkpoint not found"):
        eval_lm.main(["--checkpoint", str(tmp_path / "missing.pt"), "--eval-data", data, "--tokenizer-dir", str(ROOT)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好"}\n{"text": \n', encoding="utf-8")
    ar = save_tiny(tmp_path / "ar.pt", "ar")
    with pytest.raises(NanoLladaError, match=r"bad.jsonl:2: malformed JSON"):
        eval_lm.main(["--checkpoint", ar, "--eval-data", str(bad), "--tokenizer-dir", str(ROOT), "--device", "cpu"])
