"""The download entry point against a fake `modelscope` (no network): what it asks for, skipping, error messages."""

import sys
import types

import pytest

from model.errors import NanoLladaError
from scripts.data.download import main


@pytest.fixture
def fake_modelscope(monkeypatch):
    """Installs a fake modelscope.hub.file_download that records requests and writes a stub file."""
    requests = []

    def fake_download(kind):
        def download(repo, filename, local_dir=None, **kwargs):
            requests.append((kind, repo, filename, local_dir))
            if getattr(fake, "error", None):
                raise fake.error
            path = f"{local_dir}/{filename}"
            with open(path, "w") as f:
                f.write("stub")
            return path

        return download

    fake = types.ModuleType("modelscope.hub.file_download")
    fake.dataset_file_download = fake_download("dataset")
    fake.model_file_download = fake_download("model")
    fake.requests = requests
    monkeypatch.setitem(sys.modules, "modelscope", types.ModuleType("modelscope"))
    monkeypatch.setitem(sys.modules, "modelscope.hub", types.ModuleType("modelscope.hub"))
    monkeypatch.setitem(sys.modules, "modelscope.hub.file_download", fake)
    return fake


def test_default_files_come_from_the_minimind_dataset(fake_modelscope, tmp_path):
    paths = main(["--out-dir", str(tmp_path)])
    assert [(kind, repo, name) for kind, repo, name, _ in fake_modelscope.requests] == [
        ("dataset", "gongjy/minimind_dataset", "pretrain_hq.jsonl"),
        ("dataset", "gongjy/minimind_dataset", "sft_mini_512.jsonl"),
        ("dataset", "gongjy/minimind_dataset", "dpo.jsonl"),
    ]
    assert paths == [tmp_path / name for name in ("pretrain_hq.jsonl", "sft_mini_512.jsonl", "dpo.jsonl")]


def test_existing_files_are_skipped_unless_forced(fake_modelscope, tmp_path, capsys):
    (tmp_path / "pretrain_hq.jsonl").write_text("already here")
    main(["--out-dir", str(tmp_path), "--files", "pretrain_hq.jsonl"])
    assert fake_modelscope.requests == [] and "already there" in capsys.readouterr().out
    main(["--out-dir", str(tmp_path), "--files", "pretrain_hq.jsonl", "--force"])
    assert len(fake_modelscope.requests) == 1


def test_minimind2_goes_into_its_own_folder(fake_modelscope, tmp_path):
    main(["--out-dir", str(tmp_path), "--files", "sft_mini_512.jsonl", "--minimind2"])
    model_requests = [(name, local_dir) for kind, _, name, local_dir in fake_modelscope.requests if kind == "model"]
    assert sorted(name for name, _ in model_requests) == [
        "full_sft_512.pth",
        "pretrain_512.pth",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert {local_dir for _, local_dir in model_requests} == {str(tmp_path / "minimind2")}
    assert (tmp_path / "minimind2" / "full_sft_512.pth").is_file()


def test_network_failure_names_the_manual_command(fake_modelscope, tmp_path):
    fake_modelscope.error = ConnectionError("no route to host")
    with pytest.raises(NanoLladaError) as err:
        main(["--out-dir", str(tmp_path)])
    message = str(err.value)
    assert "\n" not in message and "no route to host" in message
    assert "modelscope download --dataset gongjy/minimind_dataset pretrain_hq.jsonl --local_dir ./dataset" in message
    assert "uv run python -m scripts.data.sample" in message


def test_missing_package_is_a_clean_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope...` raise ImportError
    with pytest.raises(NanoLladaError, match="scripts.data.sample"):
        main(["--out-dir", str(tmp_path)])
