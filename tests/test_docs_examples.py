"""The documentation runs.

* docs/writing-passes.md: every ``python`` block of an ``Example`` section runs, the blocks of one
  section in one namespace;
* README.md and docs/: every ``python`` block compiles; a block right after a ``<!-- runs -->``
  comment runs (the marked blocks of one file share a namespace, in a temporary folder);
* every ``shear ...`` line of a ``bash`` / ``sh`` block parses with ``shear.cli.build_parser()``, so a
  documented option that does not exist fails (``<placeholders>`` become a dummy path);
* README.md stays a short user's page, with the own-model quick start in its first screen;
* nothing in the repository refers to a design note or paper file outside it.
"""

from __future__ import annotations

import re
import shlex
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-passes.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_ANY_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
_RUNS = "<!-- runs -->"
README_MAX_LINES = 300
QUICK_START = "Prune your own model"


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


# ------------------------------------------------------------------ README.md and docs/


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[tuple[str, int, str, bool]]:
    """(language, first code line, code, marked ``<!-- runs -->``) for every fenced block."""
    text = path.read_text()
    out = []
    for match in _ANY_FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        line = text[: match.start()].count("\n") + 2
        out.append((match.group(1).lower(), line, match.group(2), before == _RUNS))
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


PYTHON_BLOCKS = [(_rel(p), line, code) for p in doc_files() for lang, line, code, _ in blocks(p) if lang == "python"]
RUN_FILES = [_rel(p) for p in doc_files() if any(lang == "python" and runs for lang, _, _, runs in blocks(p))]


def test_docs_have_python_blocks_and_runnable_ones() -> None:
    assert len(PYTHON_BLOCKS) >= 10
    assert "README.md" in RUN_FILES


@pytest.mark.parametrize(("path", "line", "code"), PYTHON_BLOCKS, ids=[f"{p}:{n}" for p, n, _ in PYTHON_BLOCKS])
def test_python_block_compiles(path: str, line: int, code: str) -> None:
    compile("\n" * (line - 1) + code, str(ROOT / path), "exec", dont_inherit=True)


@pytest.mark.parametrize("path", RUN_FILES)
def test_marked_blocks_run(path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write out/...: keep the checkout clean
    module = types.ModuleType("docs_run_" + re.sub(r"\W", "_", path))
    module.__file__ = str(ROOT / path)
    sys.modules[module.__name__] = module
    try:
        for lang, line, code, runs in blocks(ROOT / path):
            if lang == "python" and runs:
                exec(compile("\n" * (line - 1) + code, str(ROOT / path), "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[module.__name__]


def shear_commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) for every ``shear ...`` command of the shell blocks, continuations joined."""
    out = []
    for lang, first, code, _ in blocks(path):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        pending, start = "", 0
        for i, raw in enumerate(code.splitlines()):
            text = raw.strip()
            if text.startswith("$ "):
                text = text[2:]
            if not pending:
                start = first + i
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            command, pending = pending + text, ""
            if command.startswith("shear "):
                out.append((start, command))
    return out


SHEAR_COMMANDS = [(_rel(p), line, cmd) for p in doc_files() for line, cmd in shear_commands(p)]


def test_docs_show_shear_commands() -> None:
    assert {"prune", "export", "plan", "stream-prune"} <= {cmd.split()[1] for _, _, cmd in SHEAR_COMMANDS}


@pytest.mark.parametrize(("path", "line", "command"), SHEAR_COMMANDS, ids=[f"{p}:{n}" for p, n, _ in SHEAR_COMMANDS])
def test_shear_command_parses(path: str, line: int, command: str) -> None:
    from shear.cli import build_parser

    argv = shlex.split(re.sub(r"<[^<>]+>", "model_dir", command), comments=True)
    assert argv[0] == "shear"
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as e:  # argparse printed why on stderr
        pytest.fail(f"{path}:{line}: `{command}` does not parse (exit {e.code})")


def test_readme_is_short_with_the_quick_start_first() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move material to docs/"
    assert any(QUICK_START in line for line in lines[:60]), f"{QUICK_START!r} is not in README.md's first 60 lines"


_OUTSIDE = ("DESIGN" + ".md", "papers" + "/")  # spelled in two parts so this file does not match itself
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".cfg", ".json", ".sh", ""}
_SKIP_DIRS = {".git", ".venv", ".venv-compat", "out", "__pycache__", "node_modules"}


def _repository_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in _TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
            out.append(path)
    return out


def test_nothing_refers_to_files_outside_the_repository() -> None:
    hits = []
    for path in _repository_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(needle in line for needle in _OUTSIDE):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
