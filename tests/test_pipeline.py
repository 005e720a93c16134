"""Pipelines: string / TOML / YAML parsing, typed options, round trips, and every error path."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shear.passes as sp
from shear.errors import PipelineError
from shear.passes import (
    Context,
    Pass,
    PassResult,
    format_pipeline,
    load_pipeline,
    parse_pipeline,
    pass_options,
    register_pass,
    resolve_pipeline,
)
from shear.passes import registry as registry_module


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@register_pass
@dataclass(frozen=True)
class Opts(Pass):
    """A pass with one option of every supported kind."""

    name = "test-opts"
    ratio: float = 0.5
    """Fraction of structures to prune."""
    seed: int = 0
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    layers: tuple[int, ...] = ()
    label: str = "x"
    limit: int | None = None
    color: Color = Color.RED
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")

    def run(self, ctx: Context) -> PassResult:
        return PassResult(changed=False)


@register_pass
@dataclass(frozen=True)
class Needs(Pass):
    name = "test-needs"
    count: int

    def run(self, ctx: Context) -> PassResult:
        return PassResult(changed=False)


def test_string_parses_to_typed_options() -> None:
    passes = parse_pipeline(
        "test-opts{ratio=0.25, seed=3 flag=true mode=slow layers=[1,2] label='a, b}' limit=none color=blue names=[x,y]},"
        " test-opts"
    )
    assert passes == [
        Opts(ratio=0.25, seed=3, flag=True, mode="slow", layers=(1, 2), label="a, b}", limit=None, color=Color.BLUE, names=["x", "y"]),
        Opts(),
    ]


def test_object_string_and_files_are_identical(tmp_path: Path) -> None:
    objects = [Opts(ratio=0.3, seed=1, layers=(0, 2)), Needs(count=4)]
    text = "test-opts{ratio=0.3,seed=1,layers=[0,2]},test-needs{count=4}"
    toml = tmp_path / "p.toml"
    toml.write_text(
        '[[passes]]\nname = "test-opts"\nratio = 0.3\nseed = 1\nlayers = [0, 2]\n\n'
        '[[passes]]\nname = "test-needs"\noptions = { count = 4 }\n'
    )
    toml_string = tmp_path / "q.toml"
    toml_string.write_text(f'pipeline = "{text}"\n')
    assert resolve_pipeline(objects) == objects
    assert resolve_pipeline(text) == objects
    assert resolve_pipeline(toml) == objects
    assert resolve_pipeline(str(toml)) == objects
    assert resolve_pipeline(toml_string) == objects
    assert resolve_pipeline(format_pipeline(objects)) == objects
    assert resolve_pipeline(["test-opts{ratio=0.3,seed=1,layers=[0,2]}", Needs(count=4)]) == objects


def test_yaml_file(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "p.yaml"
    path.write_text("passes:\n  - test-opts: {ratio: 0.3, seed: 1, layers: [0, 2]}\n  - name: test-needs\n    count: 4\n  - test-opts\n")
    assert load_pipeline(path) == [Opts(ratio=0.3, seed=1, layers=(0, 2)), Needs(count=4), Opts()]


def test_pass_class_and_text_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("test-opts{seed=2}\n")
    assert resolve_pipeline(Opts) == [Opts()]
    assert load_pipeline(path) == [Opts(seed=2)]


def test_friendly_names_and_options_docs() -> None:
    assert sp.TestOpts is Opts
    assert sp.Opts is Opts
    docs = {o.name: o for o in pass_options(Opts)}
    assert docs["ratio"].doc == "Fraction of structures to prune."
    assert docs["layers"].type_name == "tuple[int, ...]"
    assert pass_options(Needs)[0].required


@settings(max_examples=40, deadline=None)
@given(
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(-(2**40), 2**40),
    flag=st.booleans(),
    layers=st.lists(st.integers(0, 99), max_size=4).map(tuple),
    label=st.text(st.characters(codec="ascii", exclude_characters="\\"), max_size=8),
    limit=st.none() | st.integers(0, 10),
)
def test_format_parse_round_trip(
    ratio: float, seed: int, flag: bool, layers: tuple[int, ...], label: str, limit: int | None
) -> None:
    p = Opts(ratio=ratio, seed=seed, flag=flag, layers=layers, label=label, limit=limit)
    assert parse_pipeline(format_pipeline([p])) == [p]


# -- errors -------------------------------------------------------------------------------------


def test_unknown_pass_lists_closest_first() -> None:
    with pytest.raises(PipelineError, match=r"unknown pass 'test-opst'; did you mean 'test-opts'\? Valid passes \(closest first\): test-opts"):
        parse_pipeline("test-opst{ratio=0.1}")


def test_unknown_pass_mentions_broken_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry_module._IMPORT_ERRORS, "shear.passes.broken", "SyntaxError: oops")
    with pytest.raises(PipelineError, match=r"failed to import: shear.passes.broken \(SyntaxError: oops\)"):
        parse_pipeline("nope")


def test_unknown_option_lists_valid_closest_first() -> None:
    with pytest.raises(PipelineError, match=r"pass 'test-opts' has no option 'sed'. Valid options \(closest first\): seed: int"):
        parse_pipeline("test-opts{sed=1}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test-opts{seed=0.5}", r"option 'seed' expects int, got '0.5' \(str\)"),
        ("test-opts{ratio=half}", r"option 'ratio' expects float, got 'half'"),
        ("test-opts{flag=maybe}", r"option 'flag' expects bool, got 'maybe'"),
        ("test-opts{mode=medium}", r"option 'mode' expects 'fast' \| 'slow', got 'medium'"),
        ("test-opts{layers=[1,x]}", r"option 'layers' expects tuple\[int, \.\.\.\], got \['1', 'x'\] \(list\)"),
        ("test-opts{limit=lots}", r"option 'limit' expects int \| None, got 'lots'"),
        ("test-opts{color=green}", r"option 'color' expects Color, got 'green'"),
    ],
)
def test_bad_option_type_names_option_type_and_value(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_bad_option_type_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[passes]]\nname = "test-opts"\nseed = "three"\n')
    with pytest.raises(PipelineError, match=r"p.toml, pass #1: pass 'test-opts': option 'seed' expects int, got 'three'"):
        load_pipeline(path)
    path.write_text('[[passes]]\nname = "test-opts"\nflag = 1\n')
    with pytest.raises(PipelineError, match=r"option 'flag' expects bool, got 1 \(int\)"):
        load_pipeline(path)


def test_pass_validation_becomes_pipeline_error() -> None:
    with pytest.raises(PipelineError, match=r"pass 'test-opts' rejected its options .*ratio must be in \[0, 1\], got 2.0"):
        parse_pipeline("test-opts{ratio=2}")


def test_missing_required_option() -> None:
    with pytest.raises(PipelineError, match=r"pass 'test-needs': missing required option\(s\) count"):
        parse_pipeline("test-needs")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("test-opts{seed=1", r"column 17: unclosed '\{'"),
        ("test-opts{seed}", r"expected '=' after option 'seed'"),
        ("test-opts,", r"expected a pass name after ','"),
        ("test-opts test-opts", r"expected ',' between passes, found 't'"),
        ("test-opts{seed=1,seed=2}", r"option 'seed' given twice"),
        ("test-opts{label='abc}", r"unclosed '"),
    ],
)
def test_syntax_errors_point_at_the_column(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_file_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PipelineError, match=r"pipeline file '.*missing.toml' does not exist"):
        resolve_pipeline(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[passes]\n")
    with pytest.raises(PipelineError, match=r"is not valid TOML"):
        load_pipeline(bad)
    empty = tmp_path / "empty.toml"
    empty.write_text('title = "x"\n')
    with pytest.raises(PipelineError, match=r"expected a `passes` list or a `pipeline` string, found keys \['title'\]"):
        load_pipeline(empty)
    weird = tmp_path / "weird.toml"
    weird.write_text("passes = [1]\n")
    with pytest.raises(PipelineError, match=r"pass #1: a pass is a string or a table, got 1"):
        load_pipeline(weird)
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("passes: [test-opts]\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(PipelineError, match=r"is YAML, which needs PyYAML: `pip install pyyaml`"):
        load_pipeline(yaml_path)


def test_file_size_depth_and_txt_hint(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("#" * ((1 << 20) + 1))
    with pytest.raises(PipelineError, match=r"big.toml' is 1,048,577 bytes; a pipeline file holds a few passes \(at most 1,048,576 bytes\): check"):
        load_pipeline(big)
    deep = tmp_path / "deep.toml"
    deep.write_text("passes = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PipelineError, match=r"deep.toml' is nested too deep to be a pipeline; check the file"):
        load_pipeline(deep)
    table = tmp_path / "table.txt"
    table.write_text('name = "test-opts"\n')
    with pytest.raises(PipelineError, match=r"(?s)table.txt': bad pipeline string.*\(a .txt file holds one pipeline string.*goes in a .toml file\)$"):
        load_pipeline(table)
    typo = tmp_path / "typo.txt"
    typo.write_text("test-opts{ratio=oops}\n")
    with pytest.raises(PipelineError, match=r"typo.txt': pass 'test-opts': option 'ratio' expects float, got 'oops' \(str\); give ratio=<float>$"):
        load_pipeline(typo)
    pytest.importorskip("yaml")
    deep = tmp_path / "deep.yaml"
    deep.write_text("passes: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(PipelineError, match=r"deep.yaml' is nested too deep to be a pipeline; check the file"):
        load_pipeline(deep)
    one = tmp_path / "one.yaml"
    one.write_text("test-opts{ratio=oops}\n")
    with pytest.raises(PipelineError, match=r"one.yaml': pass 'test-opts': option 'ratio' expects float, got 'oops' \(str\); give ratio=<float>$"):
        load_pipeline(one)


def test_not_a_pipeline() -> None:
    with pytest.raises(PipelineError, match=r"cannot make a pipeline from int"):
        resolve_pipeline(3)  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"nested lists are not pipelines"):
        resolve_pipeline([["test-opts"]])  # type: ignore[list-item]


def test_unknown_friendly_name() -> None:
    with pytest.raises(AttributeError, match=r"has no pass 'NoSuchPass'; registered passes: .*TestOpts"):
        sp.NoSuchPass  # noqa: B018
