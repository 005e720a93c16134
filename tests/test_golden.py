"""The golden-file fixture: a missing file fails; ``--update-golden`` or SHEAR_UPDATE_GOLDEN=1 writes it."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

_TEST = """
from pathlib import Path

def test_text(golden):
    golden(Path("golden/g.txt"), "hello\\n")
"""


def test_missing_golden_fails_until_updated_on_purpose(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEAR_UPDATE_GOLDEN", raising=False)
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_text=_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*golden file*g.txt is missing: run pytest --update-golden*"])
    assert not (pytester.path / "golden/g.txt").exists()

    pytester.runpytest("-p", "no:cacheprovider", "--update-golden").assert_outcomes(passed=1)
    assert (pytester.path / "golden/g.txt").read_text() == "hello\n"
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)

    (pytester.path / "golden/g.txt").write_text("changed\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
    monkeypatch.setenv("SHEAR_UPDATE_GOLDEN", "1")  # the environment variable still works
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert (pytester.path / "golden/g.txt").read_text() == "hello\n"
