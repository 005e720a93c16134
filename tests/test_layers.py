"""Architecture at the seams: layers import one way, every module sits in a layer, and every error
shear raises is a ShearError.

The layers are the import-linter contract in pyproject.toml (``[tool.importlinter]``); ``lint-imports``
checks them from the shell, and these tests run the same check, with no ignored imports.
"""

from __future__ import annotations

import ast
import builtins
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shear"


def _contract() -> dict:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = config["contracts"]
    return contract


def _layers() -> list[tuple[set[str], bool]]:
    """(modules, independent) per layer, top first, as the contract lists them."""
    out = []
    for layer in _contract()["layers"]:
        sep = "|" if "|" in layer else ":"
        out.append(({m.strip() for m in layer.split(sep)}, sep == "|"))
    return out


def _graph():  # noqa: ANN202 - grimp is imported lazily
    grimp = pytest.importorskip("grimp", reason="pip install -e .[dev] (import-linter brings grimp)")
    return grimp, grimp.build_graph("shear", cache_dir=None)


def test_contract_lists_no_exceptions() -> None:
    contract = _contract()
    assert contract["type"] == "layers"
    assert not contract.get("ignore_imports"), "fix a back-arrow instead of listing it"
    assert not contract.get("exclude_type_checking_imports"), "type-only imports count as imports"


def test_lint_imports_keeps_the_layers(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("importlinter", reason="pip install -e .[dev] installs import-linter")
    from importlinter.cli import lint_imports

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, capsys.readouterr().out


def test_every_module_sits_in_a_layer() -> None:
    _, graph = _graph()
    named = set().union(*(modules for modules, _ in _layers()))
    packages = {"shear"}  # hold layers of different heights; their __init__ only re-exports
    outside = sorted(
        m for m in graph.modules
        if m not in packages and not any(m == n or m.startswith(n + ".") for n in named)
    )
    assert not outside, f"place these modules in a layer of [tool.importlinter] in pyproject.toml: {outside}"


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("shear.graph.ir", "shear.passes.base"),  # the IR reaching up into the passes
        ("shear.kernels.saliency", "shear.training.loop"),  # a kernel into training
        ("shear.kernels.recovery", "shear.figures"),  # a kernel that plots (the back-arrow the layout move removed)
        ("shear.codegen.verify", "shear.kernels.ebft"),  # codegen and kernels are independent siblings
        ("shear.model.blocks", "shear.kernels.ebft"),  # a model fact asking a kernel
        ("shear.data.text", "shear.zoo.tiny"),  # two independent siblings
    ],
)
def test_a_planted_back_arrow_is_caught(importer: str, imported: str) -> None:
    grimp, graph = _graph()
    layers = [grimp.Layer(*modules, independent=independent) for modules, independent in _layers()]
    assert not graph.find_illegal_dependencies_for_layers(layers=layers)
    graph.add_import(importer=importer, imported=imported)
    assert graph.find_illegal_dependencies_for_layers(layers=layers)


def _import_graph():  # noqa: ANN202 - networkx and grimp are imported lazily
    import networkx as nx

    _, graph = _graph()
    g = nx.DiGraph()
    for m in graph.modules:
        g.add_node(m)
        g.add_edges_from((m, d) for d in graph.find_modules_directly_imported_by(m))
    return nx, g


def test_no_import_circles_between_files() -> None:
    """Every import counts (module-level, deferred in a function, or under TYPE_CHECKING): a circle
    hidden by a deferred import is still a circle."""
    nx, g = _import_graph()
    circles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not circles, f"import circles between files: {circles}"


def test_no_top_level_package_holds_over_a_fifth_of_the_code() -> None:
    lines: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        top = parts[0] if len(parts) > 1 else "(top-level modules)"
        lines[top] = lines.get(top, 0) + len(path.read_text().splitlines())
    total = sum(lines.values())
    big = {k: f"{v / total:.0%}" for k, v in lines.items() if v > 0.2 * total}
    assert not big, f"packages over 20% of shear's {total} lines: {big}"


# -- errors ---------------------------------------------------------------------------------------

_BUILTIN_ERRORS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception)}
"""Built-in exceptions that report a failure (``SystemExit`` and ``KeyboardInterrupt`` are not ``Exception``)."""


def _allowed(name: str, function: str | None, call: ast.expr) -> bool:
    """Built-in raises that are protocol, not failures: an abstract method, the end of an iterator, ``__getattr__`` saying
    "no such attribute" (``hasattr`` relies on it), a mapping's ``__getitem__``/``__delitem__`` saying "no such key"
    (``Mapping.get`` and ``in`` rely on it), an OS error passed on with its errno."""
    if name in ("NotImplementedError", "StopIteration"):
        return True
    if name == "AttributeError" and function in ("__getattr__", "__getattribute__"):
        return True
    if name == "KeyError" and function in ("__getitem__", "__delitem__"):
        return True
    args = call.args if isinstance(call, ast.Call) else []
    return name == "OSError" and len(args) >= 2 and not isinstance(args[0], ast.Constant)


def _bare_builtin_raises(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                target = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(target, ast.Name) and target.id in _BUILTIN_ERRORS:
                    if not _allowed(target.id, function, child.exc):
                        found.append(f"{path.relative_to(root)}:{child.lineno}: raise {target.id}")
            visit(child, function)

    visit(tree, None)
    return found


def test_no_bare_builtin_raises() -> None:
    """errors.py promises every error is a ShearError: raise the layer's subclass (it may also derive
    from ValueError/TypeError where callers catch those), never a bare built-in."""
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _bare_builtin_raises(path)]
    assert not found, "raise a ShearError subclass named for the layer instead:\n" + "\n".join(found)


def test_the_scan_sees_a_bare_raise(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x):\n    if x:\n        raise ValueError('no')\n    raise TypeError\n")
    assert _bare_builtin_raises(bad, tmp_path) == ["bad.py:3: raise ValueError", "bad.py:4: raise TypeError"]
