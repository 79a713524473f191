import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MINIMIND2_FIXTURES = ROOT.parent / "shared" / "fixtures" / "minimind2"

from model.config import ModelConfig  # noqa: E402

# The shape of every tiny test model: as keyword options of ModelConfig, and as the trainers' flags (with cli()).
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
# The training loop's tests (one process and DDP): a short run with 2-step accumulation, evaluations every 3 steps.
TINY_TRAINING = {
    "learning_rate": 3e-3,
    "warmup_steps": 2,
    "accumulation_steps": 2,
    "eval_interval": 3,
    "save_interval": 100,
    "log_interval": 2,
}


def sample_subset(out: Path, rows: dict[str, int]) -> dict[str, Path]:
    """The first `rows[name]` lines of each offline sample file sample_{name}.jsonl, written to out/{name}.jsonl:
    enough for a few training steps on a tiny model, quick to tokenize."""
    from scripts.data.sample import build_sample

    files = build_sample(out)
    subset = {}
    for name, count in rows.items():
        lines = files[f"sample_{name}.jsonl"].read_text(encoding="utf-8").splitlines()[:count]
        subset[name] = out / f"{name}.jsonl"
        subset[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return subset


def lively_model(config: ModelConfig):
    """A random model in eval mode with large weights: its greedy outputs vary from token to token (a 0.02-init
    model repeats its last input, which would make equal outputs meaningless). Seed before calling."""
    from model.transformer import Transformer

    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(**TINY_MODEL, vocab_size=101, max_position_embeddings=256)


@pytest.fixture
def minimind2_fixtures() -> Path:
    if not (MINIMIND2_FIXTURES / "minimind2_tiny.pth").exists():
        pytest.skip(f"MiniMind2 fixtures not found at {MINIMIND2_FIXTURES} (they live in the team's shared/ folder)")
    return MINIMIND2_FIXTURES


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class UniformModel(torch.nn.Module):
    """Identical logits everywhere: every loss and likelihood has a closed form (ln|V| per scored token)."""

    def __init__(self, vocab: int = 101):
        super().__init__()
        self.vocab, self.anchor = vocab, torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []  # every input it was called on

    def forward(self, ids, attention="bidirectional", logits_at=None, targets=None, **_):
        from model.cross_entropy import logits_or_nll

        self.inputs.append(ids.clone())
        logits = torch.zeros(*ids.shape, self.vocab) + self.anchor
        return logits_or_nll(logits if logits_at is None else logits[:, logits_at], targets)
