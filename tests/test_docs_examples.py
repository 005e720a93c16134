"""docs/writing-passes.md runs: every ``python`` block, the blocks of one section in one namespace."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-passes.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def sections() -> dict[str, list[tuple[int, str]]]:
    """``## heading`` → [(line, code)] for the python blocks under it."""
    text = DOC.read_text()
    out: dict[str, list[tuple[int, str]]] = {}
    for match in _FENCE.finditer(text):
        heading = re.findall(r"^## (.+)$", text[: match.start()], re.M)[-1]
        line = text[: match.start()].count("\n") + 2
        out.setdefault(heading, []).append((line, match.group(1)))
    return out


def test_the_guide_has_both_examples() -> None:
    names = list(sections())
    assert any("importance criterion" in n for n in names) and any("new op" in n for n in names)


@pytest.mark.parametrize("heading", [h for h in sections() if h.startswith("Example")])
def test_example_runs(heading: str) -> None:
    module = types.ModuleType(f"docs_example_{heading.split(':')[0].replace(' ', '_').lower()}")
    module.__file__ = str(DOC)
    sys.modules[module.__name__] = module  # dataclasses and typing resolve annotations through it
    try:
        for line, code in sections()[heading]:
            exec(compile("\n" * (line - 1) + code, str(DOC), "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[module.__name__]
