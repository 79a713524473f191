"""The import rule the layout promises, read from the source: the library (model/) never imports scripts/; the shared
code in scripts/common/ is layered by concern, each layer importing only layers below it:

    model  <-  scripts.common (cli, device, pipeline)  <-  data  <-  training | evaluation  <-  serving | bench

and nothing shared imports an entry point. So a data module never reaches the trainer, and the training flags
never reach evaluation."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Each package of scripts/common and the packages it may import (besides itself, model and the base modules).
LAYERS = {
    "data": set(),
    "training": {"data"},
    "evaluation": {"data"},
    "serving": {"data", "evaluation"},
    "bench": {"data", "training", "evaluation"},
}
BASE = {"cli", "device", "pipeline"}  # scripts/common/*.py: used by every layer, importing none of them


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def shared_part(module: str) -> str | None:
    """The layer of a scripts.common module ('base' or a package name), None for anything else."""
    parts = module.split(".")
    if parts[:2] != ["scripts", "common"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in LAYERS else "base"


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_scripts(path):
    assert not [m for m in imported_modules(path) if m.split(".")[0] == "scripts"]


@pytest.mark.parametrize("path", sources("scripts/common"), ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_code_imports_only_the_layers_below_it(path):
    relative = path.relative_to(ROOT / "scripts" / "common")
    own = relative.parts[0] if len(relative.parts) > 1 else "base"
    allowed = {own, "base"} | LAYERS.get(own, set()) if own != "base" else {"base"}
    wrong = []
    for module in imported_modules(path):
        part = shared_part(module)
        if part is not None and part not in allowed:
            wrong.append(module)
        elif module.startswith("scripts.") and part is None and module != "scripts.common":
            wrong.append(module)  # an entry point
    assert not wrong, f"{relative} ({own}) imports {sorted(wrong)}"


def test_no_folder_holds_more_than_fifteen_modules():
    for folder in [ROOT / "scripts" / "common", *(ROOT / "scripts" / "common").iterdir()]:
        if folder.is_dir() and folder.name != "__pycache__":
            modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
            assert len(modules) <= 15, f"{folder.relative_to(ROOT)} holds {len(modules)} modules"


# The library's layers: the architecture and formats at the top of model/, then what training minimises, then
# decoding and scoring. The Hugging Face export (model/hf/) is one of the formats, beside the checkpoint.
MODEL_LAYERS = {"top": {"top", "hf"}, "objectives": {"top", "objectives"}}
MODEL_LAYERS["hf"] = {"top", "hf", "objectives"}  # an export also says how it decodes: the trained block size
MODEL_LAYERS["inference"] = {"top", "objectives", "inference"}


def model_part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "model" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in MODEL_LAYERS else "top"


@pytest.mark.parametrize("path", sources("model"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_layers_import_downwards(path):
    relative = path.relative_to(ROOT / "model")
    own = relative.parts[0] if len(relative.parts) > 1 else "top"
    wrong = [m for m in imported_modules(path) if model_part(m) not in (None, *MODEL_LAYERS[own])]
    assert not wrong, f"model/{relative} ({own}) imports {sorted(wrong)}"


def test_no_library_folder_holds_more_than_fifteen_modules():
    for folder in [ROOT / "model", *(p for p in (ROOT / "model").iterdir() if p.is_dir())]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 15, f"{folder.relative_to(ROOT)} holds {len(modules)} modules"


def test_files_fit_in_one_sitting_and_functions_on_a_screen():
    """At most 360 lines a file and 80 a function (the standalone model/hf/ copy aside)."""
    too_long = []
    for path in sorted(ROOT.glob("**/*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in (".venv", "weights", "dataset") or relative.parts[:2] == ("model", "hf"):
            continue
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 360:
            too_long.append(f"{relative}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{relative}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def entry_points() -> list[Path]:
    top = [p for p in (ROOT / "scripts").glob("*.py") if p.name != "__init__.py"]
    return sorted(top + [p for d in ("train", "eval", "data") for p in (ROOT / "scripts" / d).glob("*.py")])


def module_name(path: Path) -> str:
    return path.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")


@pytest.mark.parametrize("path", entry_points(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_entry_point_imports_another(path):
    """What two entry points share lives in scripts/common/ (scripts/gpu_check/ alone drives entry points: it
    checks them)."""
    others = {module_name(p) for p in entry_points()} - {module_name(path)}
    assert not sorted(imported_modules(path) & others)
