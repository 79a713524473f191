"""tests/mutation_test.py on a throwaway package: what it mutates, and what it calls killed and equivalent."""

import tempfile

from mutation_test import main, mutate, relevant_tests, sites_of

CALC = '''\
"""A module docstring that mentions a + b and 3 < 4."""


def add(a: int, b: int = 2) -> int:
    """Adds: a + b."""
    if a < -100:
        raise ValueError("too small: " + str(a - 1))
    assert b > 0, "b must be positive"
    return a + b


def magnitude(a):
    return -a if a < 0 else a
'''

TEST_CALC = """\
from pkg.calc import add, magnitude


def test_add():
    assert add(2, 3) == 5


def test_magnitude():
    assert magnitude(-4) == 4 and magnitude(5) == 5
"""


def _package(tmp_path):
    (tmp_path / "pkg").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "calc.py").write_text(CALC)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_calc.py").write_text(TEST_CALC)
    (tmp_path / "tests" / "test_other.py").write_text("def test_nothing():\n    pass\n")
    return tmp_path


def test_sites_skip_docstrings_raise_assert_and_annotations(tmp_path):
    root = _package(tmp_path)
    mutants = sites_of(root / "pkg" / "calc.py", root)
    lines = {m.line for m in mutants}
    assert lines == {4, 6, 9, 13}  # the default b = 2, `a < -100`, `return a + b`, the magnitude line
    ids = {m.id for m in mutants}
    assert {"pkg/calc.py:9:13:Add>Sub", "pkg/calc.py:9:11:Return>None", "pkg/calc.py:13:19:Lt>LtE"} <= ids
    assert "pkg/calc.py:4:25:Const2>3" in ids  # a default value is mutated, its annotation `int` is not
    source = CALC
    by_id = {m.id: m for m in mutants}
    assert mutate(source, by_id["pkg/calc.py:9:13:Add>Sub"]).splitlines()[8] == "    return a - b"
    assert mutate(source, by_id["pkg/calc.py:6:11:USub>drop"]).splitlines()[5] == "    if a < 100:"
    assert mutate(source, by_id["pkg/calc.py:13:11:USub>drop"]).splitlines()[12] == "    return a if a < 0 else a"


def test_relevant_tests_are_the_importers(tmp_path):
    root = _package(tmp_path)
    assert relevant_tests("pkg/calc.py", root) == ["tests/test_calc.py"]


def test_a_real_mutant_is_killed_and_an_equivalent_one_is_listed(tmp_path, monkeypatch, capsys):
    root = _package(tmp_path / "repo")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    killed, equivalent, survivor = "pkg/calc.py:9:13:Add>Sub", "pkg/calc.py:13:19:Lt>LtE", "pkg/calc.py:6:9:Lt>LtE"
    listed = tmp_path / "equivalent.txt"
    listed.write_text(f"# id  reason\n{equivalent}  -0 == 0, so a = 0 gives 0 either way\n")
    out = tmp_path / "results.json"
    ids = ["--ids", killed, equivalent, survivor]
    totals = main(["--root", str(root), "--files", "pkg", *ids, "--equivalent", str(listed), "--out", str(out)])
    assert (totals["killed"], totals["survived"], totals["equivalent"], totals["timeout"]) == (1, 1, 1, 0)
    assert totals["kill_rate"] == 0.5  # equivalent mutants are left out of the rate
    printed = capsys.readouterr().out
    assert "kill rate over non-equivalent mutants: 50.0 %" in printed
    assert f"equivalent {equivalent}" in printed and "# equivalent: -0 == 0" in printed
    assert f"survived   {survivor}\n    - if a < -100:\n    + if a <= -100:" in printed
    assert (root / "pkg" / "calc.py").read_text() == CALC  # the tree itself is never mutated
    assert list(scratch.iterdir()) == []  # the scratch copies are gone
    assert out.exists()
