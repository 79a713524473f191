import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def decodes_something(tokens) -> bool:
    """Whether decoded ids vary (more than three distinct ones): an equality between two decoders says nothing when
    both write one token again and again, which is what a 0.02-init model does."""
    ids = tokens.flatten().tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return len(set(ids)) > 3


class CommitLog:
    """Records the predictions every diffusion commit is made from; `take()` hands over those since the last take.
    Two decoders that agree on these agree at every step, not only on the final tokens."""

    def __init__(self, monkeypatch):
        from model.inference import remasking

        self.logits, commit = [], remasking.DecodingRun.commit

        def logged(run, logits, *args):
            self.logits.append(logits.clone())
            return commit(run, logits, *args)

        monkeypatch.setattr(remasking.DecodingRun, "commit", logged)

    def take(self) -> list[torch.Tensor]:
        taken, self.logits = self.logits, []
        return taken


def reference_minimind2_forward(state: dict, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """An independent, deliberately plain MiniMind2 forward: explicit repeat of KV heads and a softmax with a -inf
    mask."""

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    B, T = ids.shape
    d, nh, nkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = lambda x: x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin  # noqa: E731
    x = state["model.embed_tokens.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, state[p + "input_layernorm.weight"])
        q = (h @ state[p + "self_attn.q_proj.weight"].T).view(B, T, nh, d).transpose(1, 2)
        k = (h @ state[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, d).transpose(1, 2)
        v = (h @ state[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, d).transpose(1, 2)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d) + torch.full((T, T), float("-inf")).triu(1)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + attn @ state[p + "self_attn.o_proj.weight"].T
        h = rms(x, state[p + "post_attention_layernorm.weight"])
        mlp = F.silu(h @ state[p + "mlp.gate_proj.weight"].T) * (h @ state[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ state[p + "mlp.down_proj.weight"].T
    return rms(x, state["model.norm.weight"]) @ state["model.embed_tokens.weight"].T


TINY_MASK_ID = 100  # the last id of the tiny vocabulary (101)


def token_rows(k: int, length: int = 16) -> torch.Tensor:
    """Four rows of random non-PAD, non-mask ids of the tiny vocabulary, seeded by k."""
    return torch.randint(1, TINY_MASK_ID, (4, length), generator=torch.Generator().manual_seed(k))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a test that compiles (graph counts start at zero)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
