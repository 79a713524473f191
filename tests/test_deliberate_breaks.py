"""The breaks of tests/deliberate_breaks.py stay in step with the code: each edit still matches its file exactly once,
and each names a test that exists (the harness itself runs for minutes, so it is run by hand, not here)."""

import pytest
from conftest import ROOT
from deliberate_breaks import BREAKS


@pytest.mark.parametrize("brk", BREAKS, ids=lambda b: b.name)
def test_every_break_applies_and_names_a_real_test(brk):
    assert (ROOT / brk.path).read_text(encoding="utf-8").count(brk.old) == 1
    test_file, test_name = brk.test.split("::")
    assert f"def {test_name}(" in (ROOT / test_file).read_text(encoding="utf-8")
