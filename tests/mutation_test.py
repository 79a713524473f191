"""Mutation testing: break the code one small change at a time and check that some test fails.

    uv run python tests/mutation_test.py --files model --sample 120 --seed 0 --out mutants.json
    uv run python tests/mutation_test.py --files scripts/common/training/trainer.py --sample 25 --seed 0
    uv run python tests/mutation_test.py --ids 'model/inference/remasking.py:75:35:Lt>LtE'   # re-run named mutants

Each target file is parsed with `ast`; every mutation site gets a stable id FILE:LINE:COL:OPERATOR. The operators:
  Add<->Sub, Mult<->Div, FloorDiv>Div, Mod>FloorDiv, Pow>Mult (binary ops, also in `x op= y`);
  Lt<->LtE, Gt<->GtE, Eq<->NotEq, Is<->IsNot, In<->NotIn; And<->Or; `not x` -> `x`; `-x` -> `x`;
  number constants 0 -> 1, 1 -> 0, n -> n + 1; True <-> False; `return X` -> `return None`.
Never mutated: strings (docstrings, messages), f-strings, `raise` and `assert` statements, type annotations.

The tree is copied once into a temporary folder (one copy per job); each mutant overwrites one file there, runs
`pytest -x -q -p no:cacheprovider` on the tests relevant to that module (fastest file first) and restores the file.
Relevant to model/foo.py: the test files that import model.foo or import from `model` a name it defines, plus
RELEVANT, less SLOW (unless --all-tests); --tests replaces them. A mutant is killed when pytest fails, timed out
(counted as killed) past 60 s + 3x its tests' unmutated time, and survives when they pass. Survivors listed in
tests/mutation_equivalent.txt (id, then why no behaviour changed) are equivalent, left out of the kill rate.
Children run with OMP_NUM_THREADS=1 and write no (stale) bytecode.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "tests" / "mutation_equivalent.txt"
EXCLUDED = ("model/hf/", "model/errors.py")  # hf/: a standalone copy for export; errors.py: messages only
# Tests that exercise a module without importing it (through the modules or scripts that do).
RELEVANT = {
    "model/objectives/conversion.py": ["tests/test_conversion_cli.py"],
    "model/cross_entropy.py": ["tests/test_diffusion_loss.py", "tests/test_eval_lm.py"],
    "model/inference/remasking.py": ["tests/test_fast_decoding.py", "tests/test_logit_shift_sampling.py"],
    "scripts/common/training/trainer.py": ["tests/test_trainer.py", "tests/test_reliability_training.py"],
}
# Whole-pipeline and multi-process tests: half the suite's time, left out of the derived sets unless --all-tests.
SLOW = ("tests/test_cli_pipeline.py", "tests/test_ddp.py", "tests/test_sync_free.py")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "weights", "*.pyc")

BINARY = {"Add": "Sub", "Sub": "Add", "Mult": "Div", "Div": "Mult", "FloorDiv": "Div", "Mod": "FloorDiv", "Pow": "Mult"}
COMPARE = {"Lt": "LtE", "LtE": "Lt", "Gt": "GtE", "GtE": "Gt", "Eq": "NotEq", "NotEq": "Eq"}
COMPARE |= {"Is": "IsNot", "IsNot": "Is", "In": "NotIn", "NotIn": "In"}
SYMBOL = {"Add": "+", "Sub": "-", "Mult": "*", "Div": "/", "FloorDiv": "//", "Mod": "%", "Pow": "**", "Lt": "<"}
SYMBOL |= {"LtE": "<=", "Gt": ">", "GtE": ">=", "Eq": "==", "NotEq": "!=", "Is": "is", "IsNot": "is not"}
SYMBOL |= {"In": "in", "NotIn": "not in", "And": "and", "Or": "or"}


@dataclass
class Mutant:
    id: str
    file: str
    line: int
    start: tuple[int, int]  # (line from 1, character column from 0) of the replaced text
    end: tuple[int, int]
    new: str
    status: str = "not run"
    seconds: float = 0.0
    before: str = ""
    after: str = ""


def _char_col(lines: list[str], line: int, byte_col: int) -> int:
    return len(lines[line - 1].encode()[:byte_col].decode(errors="ignore"))


class _Sites(ast.NodeVisitor):
    """Walks one module's tree and records (start, end, new text, operator) for every mutation site."""

    def __init__(self, source: str):
        self.lines = source.splitlines(keepends=True)
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        words = ("and", "or", "is", "in", "not")
        self.ops = [t for t in tokens if t.type == tokenize.OP or (t.type == tokenize.NAME and t.string in words)]
        self.sites: list[tuple[tuple[int, int], tuple[int, int], str, str]] = []

    def _pos(self, node: ast.AST, end: bool = False) -> tuple[int, int]:
        line = node.end_lineno if end else node.lineno
        return line, _char_col(self.lines, line, node.end_col_offset if end else node.col_offset)

    def _operator(self, after: ast.AST, before: ast.AST, name: str, suffix: str = "") -> None:
        """The operator token `name` (+ `suffix`, for `+=`) between the end of `after` and the start of `before`."""
        lo, hi, words = self._pos(after, end=True), self._pos(before), SYMBOL[name].split()
        found = sorted(t for t in self.ops if lo <= t.start and t.end <= hi and t.string == words[0] + suffix)
        if found:
            start, end = found[0].start, found[0].end
            if len(words) == 2:  # `is not`, `not in`: the second word follows
                second = [t for t in self.ops if t.start >= end and t.end <= hi and t.string == words[1]]
                end = min(second, key=lambda t: t.start).end
            new = BINARY.get(name) or COMPARE.get(name) or {"And": "Or", "Or": "And"}[name]
            self.sites.append((start, end, SYMBOL[new] + suffix, f"{name}>{new}"))

    def generic_visit(self, node: ast.AST) -> None:
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "type_comment"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    self.visit(child)

    def skip(self, node):  # error paths and messages (raise, assert, f-strings): not worth a mutant each
        pass

    visit_Raise = visit_Assert = visit_JoinedStr = skip

    def visit_BinOp(self, node):
        if type(node.op).__name__ in BINARY:
            self._operator(node.left, node.right, type(node.op).__name__)
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        if type(node.op).__name__ in BINARY:
            self._operator(node.target, node.value, type(node.op).__name__, suffix="=")
        self.generic_visit(node)

    def visit_Compare(self, node):
        for left, op, right in zip([node.left, *node.comparators], node.ops, node.comparators):
            if type(op).__name__ in COMPARE:
                self._operator(left, right, type(op).__name__)
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        for left, right in zip(node.values, node.values[1:]):
            self._operator(left, right, type(node.op).__name__)
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub)):
            name = type(node.op).__name__
            self.sites.append((self._pos(node), self._pos(node.operand), "", f"{name}>drop"))
        self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            self.sites.append((self._pos(node), self._pos(node, True), str(not value), f"{value}>{not value}"))
        elif isinstance(value, (int, float)) and not isinstance(value, complex):
            new = {0: 1, 1: 0}.get(value, value + 1)
            new = type(value)(new)
            self.sites.append((self._pos(node), self._pos(node, True), repr(new), f"Const{value!r}>{new!r}"))

    def visit_Return(self, node):
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self.sites.append((self._pos(node.value), self._pos(node.value, True), "None", "Return>None"))
        self.generic_visit(node)


def sites_of(path: Path, root: Path) -> list[Mutant]:
    """Every mutant of one file, in source order."""
    source = path.read_text(encoding="utf-8")
    finder = _Sites(source)
    finder.visit(ast.parse(source))  # docstrings are strings: never mutated
    rel = path.relative_to(root).as_posix()
    return [Mutant(f"{rel}:{a[0]}:{a[1]}:{op}", rel, a[0], a, b, new) for a, b, new, op in sorted(set(finder.sites))]


def mutate(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    (l1, c1), (l2, c2) = mutant.start, mutant.end
    head, tail = lines[l1 - 1][:c1], lines[l2 - 1][c2:]
    return "".join(lines[: l1 - 1] + [head + mutant.new + tail] + lines[l2:])


def target_files(root: Path, names: list[str]) -> list[Path]:
    files = []
    for name in names:
        path = root / name
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files += [p for p in found if not any(p.relative_to(root).as_posix().startswith(x) for x in EXCLUDED)]
    return files


def relevant_tests(rel: str, root: Path) -> list[str]:
    """Test files that import the module `rel` (a path) or a name it defines through its package."""
    module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    package = module.rpartition(".")[0]
    tree = ast.parse((root / rel).read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    found = set(RELEVANT.get(rel, []))
    for test in sorted((root / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(test.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.Import) and module in names:
                found.add(test.relative_to(root).as_posix())
            elif isinstance(node, ast.ImportFrom) and (
                node.module == module or (node.module == package and defined & set(names))
            ):
                found.add(test.relative_to(root).as_posix())
    return sorted(found)


def run_tests(copy: Path, tests: list[str], timeout: float, *extra: str) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and the seconds pytest ran."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(copy)}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests]
    began = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - began
    return ("passed" if done.returncode == 0 else "failed"), time.monotonic() - began


def baseline(copy: Path, tests: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Runs every module's tests once, unmutated (they must pass), timing each test file. Returns each module's tests
    fastest file first (a mutant's first failure then comes soon under -x) and its mutant timeout."""
    for file, names in tests.items():
        if not names:
            raise SystemExit(f"{file}: no test file imports it; name its tests in RELEVANT or with --tests")
    union, xml = sorted(set().union(*tests.values())), copy / "baseline.xml"
    outcome, seconds = run_tests(copy, union, 1800.0, f"--junitxml={xml}")
    if outcome != "passed":
        raise SystemExit(f"the unmutated tests do not pass ({outcome}): {union}")
    spent = dict.fromkeys(union, 0.0)
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        name = "/".join(case.get("classname", "").split(".")[:2]) + ".py"  # tests.test_x[.Class] -> tests/test_x.py
        spent[name] = spent.get(name, 0.0) + float(case.get("time", 0))
    xml.unlink()
    print(f"unmutated: {len(union)} test files pass in {seconds:.1f} s", flush=True)
    order = {file: sorted(names, key=lambda n: spent.get(n, 0.0)) for file, names in tests.items()}
    return order, {file: 60.0 + 3 * sum(spent.get(n, 0.0) for n in names) for file, names in tests.items()}


def load_equivalent(path: Path) -> dict[str, str]:
    """id -> reason, from lines 'ID  reason' (blank lines and # comments ignored)."""
    if not path.exists():
        return {}
    rows = [line.split(None, 1) for line in path.read_text(encoding="utf-8").splitlines()]
    return {row[0]: (row[1] if len(row) > 1 else "") for row in rows if row and not row[0].startswith("#")}


def choose(mutants: list[Mutant], args: argparse.Namespace) -> list[Mutant]:
    if args.ids:
        return [m for m in mutants if m.id in set(args.ids)]
    if args.sample and args.sample < len(mutants):
        picked = random.Random(args.seed).sample(sorted(mutants, key=lambda m: m.id), args.sample)
        return sorted(picked, key=lambda m: (m.file, m.start, m.id))
    return mutants


def run_all(root: Path, mutants: list[Mutant], args: argparse.Namespace, equivalent: dict[str, str]) -> None:
    """Runs every mutant in a scratch copy per job, restoring each file after its mutant; removes the copies."""
    scratch = Path(tempfile.mkdtemp(prefix="mutation-"))
    try:
        copies = []
        for job in range(args.jobs):
            copies.append(scratch / f"copy{job}")
            shutil.copytree(root, copies[-1], ignore=COPY_IGNORE)
        derived = {m.file: relevant_tests(m.file, root) for m in mutants}
        kept = {file: [t for t in names if args.all_tests or t not in SLOW] for file, names in derived.items()}
        tests, timeouts = baseline(copies[0], {file: args.tests or names for file, names in kept.items()})
        free, lock, done = list(copies), threading.Lock(), [0]

        def one(mutant: Mutant) -> None:
            with lock:
                copy = free.pop()
            target, original = copy / mutant.file, (root / mutant.file).read_text(encoding="utf-8")
            try:
                target.write_text(mutate(original, mutant), encoding="utf-8")
                outcome, mutant.seconds = run_tests(copy, tests[mutant.file], timeouts[mutant.file])
            finally:
                target.write_text(original, encoding="utf-8")
                with lock:
                    free.append(copy)
            mutant.status = {"failed": "killed", "timeout": "timeout"}.get(outcome, "survived")
            if mutant.status == "survived" and mutant.id in equivalent:
                mutant.status = "equivalent"
            with lock:
                done[0] += 1
                print(f"[{done[0]}/{len(mutants)}] {mutant.status:10} {mutant.seconds:5.1f} s  {mutant.id}", flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, mutants))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summary(mutants: list[Mutant], equivalent: dict[str, str]) -> dict:
    counts = {s: sum(m.status == s for m in mutants) for s in ("killed", "timeout", "survived", "equivalent")}
    scored = counts["killed"] + counts["timeout"] + counts["survived"]
    rate = (counts["killed"] + counts["timeout"]) / scored if scored else 1.0
    stale = [m.id for m in mutants if m.id in equivalent and m.status in ("killed", "timeout")]
    return {"mutants": len(mutants), **counts, "kill_rate": rate, "listed_equivalent_but_killed": stale}


def report(mutants: list[Mutant], equivalent: dict[str, str], totals: dict) -> None:
    counts = ", ".join(f"{totals[s]} {s}" for s in ("killed", "timeout", "survived", "equivalent"))
    print(f"\n{totals['mutants']} mutants: {counts} (a timeout counts as killed)")
    print(f"kill rate over non-equivalent mutants: {100 * totals['kill_rate']:.1f} %")
    for mutant in mutants:
        if mutant.status in ("survived", "equivalent"):
            note = f"   # equivalent: {equivalent[mutant.id]}" if mutant.status == "equivalent" else ""
            print(f"{mutant.status:10} {mutant.id}\n    - {mutant.before}\n    + {mutant.after}{note}")
    for stale in totals["listed_equivalent_but_killed"]:
        print(f"listed as equivalent but killed (drop it from the list): {stale}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", default=["model"], help="files or folders, relative to --root")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to mutate (default: this one)")
    parser.add_argument("--tests", nargs="+", help="run these test files for every mutant instead of the derived ones")
    parser.add_argument("--all-tests", action="store_true", help="keep the SLOW test files in the derived sets")
    parser.add_argument("--sample", type=int, default=0, help="run a random sample of this many sites (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ids", nargs="+", help="run only these mutant ids")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--equivalent", type=Path, default=EQUIVALENT_FILE)
    parser.add_argument("--list", action="store_true", help="print the chosen mutants' ids and stop")
    parser.add_argument("--out", type=Path, help="write every mutant's outcome and the totals here (JSON)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` still removes the scratch copies
    root = args.root.resolve()
    files = target_files(root, args.files)
    mutants = [m for path in files for m in sites_of(path, root)]
    chosen = choose(mutants, args)
    for mutant in chosen:
        source = (root / mutant.file).read_text(encoding="utf-8")
        mutant.before = source.splitlines()[mutant.line - 1].strip()
        mutant.after = mutate(source, mutant).splitlines()[mutant.line - 1].strip()
    print(f"{len(mutants)} mutation sites in {len(files)} files, running {len(chosen)}", flush=True)
    if args.list:
        print("\n".join(f"{m.id}\t{m.after}" for m in chosen))
        return {"mutants": len(chosen)}
    equivalent = load_equivalent(args.equivalent)
    run_all(root, chosen, args, equivalent)
    totals = summary(chosen, equivalent)
    report(chosen, equivalent, totals)
    if args.out:
        args.out.write_text(json.dumps({"totals": totals, "mutants": [asdict(m) for m in chosen]}, indent=1) + "\n")
    return totals


if __name__ == "__main__":
    main()
