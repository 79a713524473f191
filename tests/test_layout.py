"""The import rule the layout promises, read from the source: the library (model/) never imports scripts/; the shared
code in scripts/common/ is layered by concern, each layer importing only layers below it:

    model  <-  scripts.common (cli, device, pipeline)  <-  data  <-  training | evaluation  <-  serving | bench

and nothing shared imports an entry point. So a data module never reaches the trainer, and the training flags
never reach evaluation."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Each layer of a layered package, and the layers it may import. A module directly in the package is in its base
# layer; a subpackage is a layer of its own.
LAYERS = {
    "scripts.common": {
        "base": {"base"},  # cli, device, pipeline: used by every layer
        "data": {"base", "data"},
        "training": {"base", "data", "training"},
        "evaluation": {"base", "data", "evaluation"},
        "serving": {"base", "data", "evaluation", "serving"},
        "bench": {"base", "data", "training", "evaluation", "bench"},
        "experiments": {"base", "experiments"},  # they run entry points (pipeline.py), never their insides
    },
    # The library: the architecture and formats at the top of model/, then what training minimises, then decoding
    # and scoring. The Hugging Face export (model/hf/) is one of the formats, beside the checkpoint, and also says
    # how a checkpoint decodes (its trained block size, from the curriculum).
    "model": {
        "base": {"base", "hf"},
        "hf": {"base", "hf", "objectives"},
        "objectives": {"base", "objectives"},
        "inference": {"base", "objectives", "inference"},
    },
}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def layer(module: str, package: str) -> str | None:
    """The layer of `package` a module belongs to, None for a module outside it."""
    if not module.startswith(package + "."):
        return None
    first = module.removeprefix(package + ".").split(".")[0]
    return first if first in LAYERS[package] else "base"


def package_folder(package: str) -> Path:
    return ROOT.joinpath(*package.split("."))


def source_id(value) -> str:
    return str(value.relative_to(ROOT)) if isinstance(value, Path) else value


def sources(package: str) -> list[tuple[str, Path]]:
    return [(package, path) for path in sorted(package_folder(package).rglob("*.py"))]


@pytest.mark.parametrize("package,path", sources("scripts.common") + sources("model"), ids=source_id)
def test_each_layer_imports_only_the_layers_below_it(package, path):
    own = layer(module_name(path), package)
    wrong = [m for m in imported_modules(path) if layer(m, package) not in (None, *LAYERS[package][own])]
    assert not wrong, f"{path.relative_to(ROOT)} ({own}) imports {sorted(wrong)}"


@pytest.mark.parametrize("package,path", sources("model"), ids=source_id)
def test_the_library_never_imports_scripts(package, path):
    assert not [m for m in imported_modules(path) if m.split(".")[0] == "scripts"]


@pytest.mark.parametrize("package,path", sources("scripts.common"), ids=source_id)
def test_shared_code_imports_no_entry_point(package, path):
    entry_points = [m for m in imported_modules(path) if m.startswith("scripts.") and layer(m, package) is None]
    assert not [m for m in entry_points if m != package]  # `from scripts.common import device` names the package


@pytest.mark.parametrize("package", LAYERS)
def test_no_folder_holds_more_than_fifteen_modules(package):
    for folder in [package_folder(package), *(p for p in package_folder(package).iterdir() if p.is_dir())]:
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


ENTRY_POINTS = sorted(
    path
    for folder in ("scripts", "scripts/train", "scripts/eval", "scripts/data", "scripts/gpu_check")
    for path in (ROOT / folder).glob("*.py")
)


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_entry_points_read_in_execution_order(path):
    """An entry point's main comes last: what it calls is read before it (settings, checks, objectives, helpers)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    names = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert "main" not in names or names[-1] == "main", names[names.index("main") + 1 :]
