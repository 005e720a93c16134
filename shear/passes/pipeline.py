"""Pipelines: a list of passes, written as objects, as a string, or in a TOML/YAML file.

The string form follows xDSL: passes separated by commas, options in braces, separated by commas
or spaces; values are bare words, quoted strings, or ``[...]`` lists::

    discover-groups,random{ratio=0.3,seed=0},erase

A TOML file holds the same as a list of tables (``name`` plus options), or one string::

    [[passes]]
    name = "random"
    ratio = 0.3
    seed = 0

    [[passes]]
    name = "erase"

YAML (needs PyYAML) takes ``passes:`` with items ``erase``, ``{random: {ratio: 0.3}}`` or
``{name: random, ratio: 0.3}``. All three forms build equal pass objects.

Example:
    >>> from dataclasses import dataclass
    >>> from shear.passes.base import Pass, register_pass
    >>> @register_pass
    ... @dataclass(frozen=True)
    ... class Shrink(Pass):
    ...     name = "shrink-example"
    ...     ratio: float = 0.5
    >>> parse_pipeline("shrink-example{ratio=0.25}, shrink-example")
    [Shrink(ratio=0.25), Shrink(ratio=0.5)]
    >>> format_pipeline(_)
    'shrink-example{ratio=0.25},shrink-example'
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from shear.errors import PipelineError
from shear.passes.base import Pass
from shear.passes.options import build_pass, format_pass
from shear.passes.registry import lookup_pass

__all__ = [
    "DEFAULT_PIPELINE",
    "LORASHEAR_PIPELINE",
    "default_pipeline",
    "PipelineSpec",
    "parse_pipeline",
    "load_pipeline",
    "resolve_pipeline",
    "format_pipeline",
]

DEFAULT_PIPELINE: tuple[str, ...] = ("discover-groups",)
"""What ``shear.compile(model)`` runs on a model that is not a language model: build the IR."""

LORASHEAR_PIPELINE: tuple[str, ...] = (
    "lora",
    "discover-groups",
    "knowledge-distribution",
    "lhspg",
    "erase",
    "recover-dynamic",
    "merge-lora",
)
"""What ``shear.compile(model, data=...)`` runs on a causal language model (LoRAShear, Algorithm 1):
add LoRA adapters (kept when the model has them), discover the minimally removable structures,
mark the most knowledge-bearing node groups unprunable, prune MLP channels progressively with LHSPG
(``lhspg{kinds=[channel,head]}`` adds attention heads; docs/results/ablation.md), erase the
zero structures, recover knowledge from the pretraining sources (``recover-dynamic{stages="pretrain,instruct"}``
adds instructions), fold LoRA away. Passes that are not registered (an optional module that failed to import) are left out with a
warning, never silently."""


def default_pipeline(model: object) -> tuple[str, ...]:
    """:data:`LORASHEAR_PIPELINE` for causal language models, :data:`DEFAULT_PIPELINE` otherwise.

    Example:
        >>> import torch
        >>> default_pipeline(torch.nn.Linear(2, 2))
        ('discover-groups',)
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    name = type(inner).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return LORASHEAR_PIPELINE
    return DEFAULT_PIPELINE


PipelineSpec = Union[str, "os.PathLike[str]", Pass, type[Pass], Sequence[Union[str, Pass, type[Pass]]], None]  # noqa: UP007
"""Anything :func:`resolve_pipeline` accepts."""

_FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".txt")
"""What a pipeline file may be: TOML, YAML (PyYAML), or a text file holding one pipeline string."""
_MAX_FILE_BYTES = 1 << 20
"""A pipeline file larger than this is refused (a real one is a few hundred bytes)."""


class _Parser:
    """Recursive descent over one pipeline string; errors point at the column."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def error(self, what: str) -> PipelineError:
        return PipelineError(f"bad pipeline string at column {self.i + 1}: {what}\n  {self.text}\n  {' ' * self.i}^")

    def skip(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.i] if self.i < len(self.text) else ""

    def word(self, stop: str) -> str:
        self.skip()
        start = self.i
        while self.i < len(self.text) and not self.text[self.i].isspace() and self.text[self.i] not in stop:
            self.i += 1
        return self.text[start : self.i]

    def pipeline(self) -> list[tuple[str, dict[str, Any]]]:
        items: list[tuple[str, dict[str, Any]]] = []
        while True:
            if self.peek() == "":
                if items:
                    raise self.error("expected a pass name after ','")
                return items
            name = self.word(",{}")
            if not name:
                raise self.error("expected a pass name")
            options = self.options() if self.peek() == "{" else {}
            items.append((name, options))
            c = self.peek()
            if c == "":
                return items
            if c != ",":
                raise self.error(f"expected ',' between passes, found {c!r}")
            self.i += 1

    def options(self) -> dict[str, Any]:
        self.i += 1  # '{'
        options: dict[str, Any] = {}
        while True:
            c = self.peek()
            if c == "}":
                self.i += 1
                return options
            if c == ",":
                self.i += 1
                continue
            if c == "":
                raise self.error("unclosed '{'")
            key = self.word("=,{}[]()")
            if not key:
                raise self.error(f"expected an option name, found {c!r}")
            if self.peek() != "=":
                raise self.error(f"expected '=' after option {key!r}")
            self.i += 1
            if key in options:
                raise self.error(f"option {key!r} given twice")
            options[key] = self.value()

    def value(self) -> Any:
        c = self.peek()
        if c in "\"'":
            return self.quoted(c)
        if c in "[(":
            close = "]" if c == "[" else ")"
            self.i += 1
            items: list[Any] = []
            while True:
                d = self.peek()
                if d == close:
                    self.i += 1
                    return items
                if d == ",":
                    self.i += 1
                    continue
                if d == "":
                    raise self.error(f"unclosed {c!r}")
                items.append(self.value())
        word = self.word(",{}[]()")
        if not word:
            raise self.error("expected a value")
        return word

    def quoted(self, quote: str) -> str:
        self.i += 1
        out = []
        while self.i < len(self.text):
            ch = self.text[self.i]
            if ch == "\\" and self.i + 1 < len(self.text):
                out.append(self.text[self.i + 1])
                self.i += 2
                continue
            if ch == quote:
                self.i += 1
                return "".join(out)
            out.append(ch)
            self.i += 1
        raise self.error(f"unclosed {quote}")


def parse_pipeline(text: str) -> list[Pass]:
    """Passes from a pipeline string, e.g. ``"random{ratio=0.3,seed=0},erase"``.

    Unknown passes or options, badly typed values and syntax errors raise :class:`PipelineError`.
    """
    return [build_pass(lookup_pass(name), options) for name, options in _Parser(text).pipeline()]


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, at most :data:`_MAX_FILE_BYTES`; else a :class:`PipelineError` with the fix."""
    try:
        size = path.stat().st_size
        if size > _MAX_FILE_BYTES:
            raise PipelineError(
                f"pipeline file {str(path)!r} is {size:,} bytes; a pipeline file holds a few passes (at most "
                f"{_MAX_FILE_BYTES:,} bytes): check that you passed the right file"
            )
        raw = path.read_bytes()
    except OSError as e:
        raise PipelineError(f"pipeline file {str(path)!r} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"pipeline file {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise PipelineError(f"pipeline file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise PipelineError(
            f"pipeline file {str(path)!r} has the suffix {suffix or '(none)'!r}; shear reads .toml, .yaml/.yml "
            "(with PyYAML) and .txt (one pipeline string such as \"random{ratio=0.3},erase\"): rename it, or give "
            "the pipeline string itself (--passes)"
        )
    text = _read_text(path)
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise PipelineError("reading TOML pipelines on Python 3.10 needs `pip install tomli`") from e
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PipelineError(f"pipeline file {str(path)!r} is not valid TOML: {e}") from e
        except RecursionError:
            raise PipelineError(f"pipeline file {str(path)!r} is nested too deep to be a pipeline; check the file") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise PipelineError(
                f"pipeline file {str(path)!r} is YAML, which needs PyYAML: `pip install pyyaml`, "
                "or write the pipeline as TOML"
            ) from e
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PipelineError(f"pipeline file {str(path)!r} is not valid YAML: {e}") from e
        except RecursionError:
            raise PipelineError(f"pipeline file {str(path)!r} is nested too deep to be a pipeline; check the file") from None
    return text


def _item_passes(item: Any, where: str) -> list[Pass]:
    if isinstance(item, str):
        return parse_pipeline(item)
    if isinstance(item, Mapping):
        item = dict(item)
        if "name" in item:
            name = item.pop("name")
            options = dict(item.pop("options", None) or {})
            options.update(item)
        elif len(item) == 1:
            name, options = next(iter(item.items()))
            options = dict(options or {})
        else:
            raise PipelineError(f"{where}: a pass is a string, a table with `name`, or a one-key table; got {item}")
        if not isinstance(name, str):
            raise PipelineError(f"{where}: pass name must be a string, got {name!r}")
        return [build_pass(lookup_pass(name), options)]
    raise PipelineError(f"{where}: a pass is a string or a table, got {item!r}")


def load_pipeline(path: str | os.PathLike[str]) -> list[Pass]:
    """Passes from a ``.toml`` / ``.yaml`` file (``passes = [...]`` or ``pipeline = "..."``), or a ``.txt``
    file holding one pipeline string. Another suffix, text that is not UTF-8 or a file past 1 MiB is
    a :class:`PipelineError` naming the file and the fix."""
    path = Path(path)
    data = _read_file(path)
    if isinstance(data, str):
        try:
            return parse_pipeline(data.strip())
        except PipelineError as e:
            table = path.suffix.lower() == ".txt" and re.match(r"\s*(\[|\w+\s*[=:])", data)  # [[passes]], name = ...
            hint = (
                "\n(a .txt file holds one pipeline string, such as \"random{ratio=0.3},erase\"; a table of passes "
                "goes in a .toml file)" if table else ""
            )
            raise PipelineError(f"pipeline file {str(path)!r}: {e}{hint}") from None
    if isinstance(data, Mapping):
        if "pipeline" in data:
            if not isinstance(data["pipeline"], str):
                raise PipelineError(f"{path}: `pipeline` must be a pipeline string")
            return parse_pipeline(data["pipeline"])
        if "passes" not in data:
            raise PipelineError(f"{path}: expected a `passes` list or a `pipeline` string, found keys {sorted(data)}")
        data = data["passes"]
    if not isinstance(data, list):
        raise PipelineError(f"{path}: `passes` must be a list, got {type(data).__name__}")
    passes: list[Pass] = []
    for i, item in enumerate(data):
        try:
            passes.extend(_item_passes(item, f"{path}, pass #{i + 1}"))
        except PipelineError as e:
            if str(path) in str(e):
                raise
            raise PipelineError(f"{path}, pass #{i + 1}: {e}") from None
    return passes


def _looks_like_file(text: str) -> bool:
    """A path rather than a pipeline string: a known file suffix, or an existing file named with a
    suffix or a folder (``--pipeline steps.cfg`` then gets the suffix error, not "unknown pass")."""
    if "{" in text or "," in text:
        return False
    name = text.strip()
    if name.lower().endswith(_FILE_SUFFIXES):
        return True
    return ("/" in name or os.sep in name or bool(Path(name).suffix)) and Path(name).is_file()


def resolve_pipeline(spec: PipelineSpec) -> list[Pass]:
    """Turn any pipeline spelling into pass objects.

    ``None`` → :data:`DEFAULT_PIPELINE`; a :class:`Pass` or pass class; a pipeline string; a path
    to a ``.toml``/``.yaml`` file; or a list mixing all of these.
    """
    if spec is None:
        return resolve_pipeline(list(DEFAULT_PIPELINE))
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, type) and issubclass(spec, Pass):
        return [build_pass(spec, {})]
    if isinstance(spec, os.PathLike):
        return load_pipeline(spec)
    if isinstance(spec, str):
        return load_pipeline(spec) if _looks_like_file(spec) else parse_pipeline(spec)
    if isinstance(spec, Sequence):
        out: list[Pass] = []
        for item in spec:
            if isinstance(item, Sequence) and not isinstance(item, str):
                raise PipelineError(f"nested lists are not pipelines: {item!r}")
            out.extend(resolve_pipeline(item))
        return out
    raise PipelineError(f"cannot make a pipeline from {type(spec).__name__}: {spec!r}")


def format_pipeline(passes: Sequence[Pass]) -> str:
    """The pipeline string that :func:`parse_pipeline` reads back into equal passes."""
    return ",".join(format_pass(p) for p in passes)
