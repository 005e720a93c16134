"""Pass options: what a pass accepts (from its dataclass fields), typed conversion, and printing.

Options are the dataclass fields of a pass. Values written in a pipeline string arrive as text
and are converted by the field's annotation (``int``, ``float``, ``bool``, ``str``, ``Path``,
``Literal[...]``, enums, ``X | None``, ``tuple[X, ...]``, ``list[X]``); values from a TOML/YAML
file arrive typed and are checked the same way. The docstring under a field (xDSL style) is its
help text.

Example:
    >>> from dataclasses import dataclass
    >>> from shear.passes.base import Pass, set_option_check
    >>> @dataclass(frozen=True)
    ... class Prune(Pass):
    ...     name = "prune-example"
    ...     ratio: float = 0.5
    ...     layers: tuple[int, ...] = ()
    >>> build_pass(Prune, {"ratio": "0.25", "layers": ["1", "2"]})
    Prune(ratio=0.25, layers=(1, 2))
    >>> format_pass(Prune(ratio=0.25))
    'prune-example{ratio=0.25}'
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import math
import re
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from shear.errors import PipelineError
from shear.passes.base import Pass, set_option_check

__all__ = [
    "OptionInfo",
    "pass_options",
    "pass_doc",
    "build_pass",
    "convert_option",
    "check_fields",
    "require_number",
    "format_pass",
    "format_value",
]

_MISSING = dataclasses.MISSING
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


@dataclass(frozen=True)
class OptionInfo:
    """One option of a pass: its name, type, default (``None`` means required) and help text."""

    name: str
    type: Any
    """The resolved annotation of the field."""
    default: Any
    """The default value, or :data:`dataclasses.MISSING` when the option is required."""
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(tp: Any) -> str:
    """A short, readable spelling of a type annotation: ``int``, ``tuple[int, ...]``, ``'a' | 'b'``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (read from source; empty when unavailable)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
            tree = ast.parse(source)
        except (OSError, TypeError, SyntaxError, IndentationError):
            continue
        node = tree.body[0] if tree.body else None
        if not isinstance(node, ast.ClassDef):
            continue
        for a, b in zip(node.body, node.body[1:], strict=False):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = inspect.cleandoc(b.value.value)
    return docs


def pass_doc(cls: type[Pass]) -> str:
    """The pass's docstring (empty when the class has none of its own)."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(f"{cls.__name__}(") or cls.__doc__ == Pass.__doc__:
        return ""
    return inspect.cleandoc(doc)


def pass_options(cls: type[Pass]) -> tuple[OptionInfo, ...]:
    """The options of a pass class, in declaration order (none when it is not a dataclass)."""
    if not dataclasses.is_dataclass(cls):
        return ()
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the raw strings
        hints = {}
    docs = _field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = _MISSING
        out.append(OptionInfo(f.name, hints.get(f.name, f.type), default, docs.get(f.name, "")))
    return tuple(out)


class _BadValue(Exception):
    pass


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in _NONE)


def _convert(value: Any, tp: Any) -> Any:
    """Convert ``value`` (text from a pipeline string, or a typed value from a file) to ``tp``."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.ClassVar:
        raise _BadValue
    if tp is type(None):
        if _is_none(value):
            return None
        raise _BadValue
    if origin in (Union, types.UnionType):
        return _convert_union(value, typing.get_args(tp))
    if origin is Literal:
        return _convert_literal(value, typing.get_args(tp))
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        return _convert_sequence(value, tp, origin, typing.get_args(tp))
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):  # before the scalars: an IntEnum is also an int
            return _convert_enum(value, tp)
        for base in tp.__mro__:
            scalar = _SCALARS.get(base)
            if scalar is not None:
                return scalar(value, tp)
        if isinstance(value, tp):
            return value
    raise _BadValue


def _convert_union(value: Any, args: tuple[Any, ...]) -> Any:
    if type(None) in args and _is_none(value):
        return None
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(value, a)
        except _BadValue:
            continue
    raise _BadValue


def _convert_literal(value: Any, args: tuple[Any, ...]) -> Any:
    for lit in args:
        if value == lit and type(value) is type(lit):
            return lit
    for lit in args:
        if isinstance(value, str) and not isinstance(lit, str):
            try:
                if _convert(value, type(lit)) == lit:
                    return lit
            except _BadValue:
                continue
    raise _BadValue


def _convert_sequence(value: Any, tp: Any, origin: Any, args: tuple[Any, ...]) -> Any:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            raise _BadValue
        return tuple(_convert(v, a) for v, a in zip(items, args, strict=True))
    item_tp = args[0] if args else Any
    converted = [_convert(v, item_tp) for v in items]
    return converted if origin is list or tp is list else tuple(converted)


def _convert_enum(value: Any, tp: type[enum.Enum]) -> Any:
    for member in tp:
        if value is member or value == member.value or value == member.name:
            return member
        if isinstance(value, str) and value == str(member.value):
            return member
    raise _BadValue


def _to_bool(value: Any, tp: type) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise _BadValue


def _to_number(value: Any, tp: type) -> Any:
    """An int or float option: a number of that kind (never a bool), or its text."""
    if isinstance(value, bool):
        raise _BadValue
    if isinstance(value, int) or (isinstance(value, float) and issubclass(tp, float)):
        return tp(value)
    if isinstance(value, str):
        try:
            return tp(value.strip())
        except ValueError:
            raise _BadValue from None
    raise _BadValue


def _to_str(value: Any, tp: type) -> str:
    if isinstance(value, str):
        return value
    raise _BadValue


def _to_path(value: Any, tp: type) -> Path:
    if isinstance(value, (str, Path)):
        return Path(value)
    raise _BadValue


_SCALARS: dict[type, Any] = {bool: _to_bool, int: _to_number, float: _to_number, str: _to_str, Path: _to_path}
"""Scalar option type -> converter ``(value, tp) -> value``; looked up along the type's MRO (``bool``
before ``int``, a ``PurePath`` subclass finds ``Path`` only if it is one)."""


def _hint(option: OptionInfo) -> str:
    """How to spell a value of the option's type, appended to a type error."""
    if option.type is bool:
        return f"; give {option.name}=true or {option.name}=false"
    return f"; give {option.name}=<{option.type_name}>"


def convert_option(pass_name: str, option: OptionInfo, value: Any) -> Any:
    """``value`` converted to the option's type, or a :class:`PipelineError` naming all three."""
    try:
        return _convert(value, option.type)
    except _BadValue:
        shown = value if not isinstance(value, str) else f"'{value}'"
        raise PipelineError(
            f"pass {pass_name!r}: option {option.name!r} expects {option.type_name}, "
            f"got {shown} ({type(value).__name__}){_hint(option)}"
        ) from None


def _admits_text(tp: Any) -> bool:
    """Whether a field of annotation ``tp`` may hold a string as it is (``str``, ``Path``, string literals)."""
    origin = typing.get_origin(tp)
    if tp in (Any, object, str) or (isinstance(tp, type) and issubclass(tp, (str, Path, enum.Enum))):
        return True
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_admits_text(a) for a in typing.get_args(tp))
    return False


def check_fields(p: Pass) -> None:
    """Check every option of a pass built in Python (``Random(ratio="0.2")``) against its annotation.

    A pipeline string's text is converted by :func:`build_pass`; a pass object made by hand is not,
    so a number given as text, a bool for a number or a list of the wrong items would surface later as
    a ``TypeError`` deep inside the pass. Every pass runs it when built, before its own
    ``__post_init__`` (installed into :class:`~shear.passes.base.Pass` below); raises
    :class:`PipelineError` naming the pass, the option and the fix.

    Example:
        >>> from shear.passes.baselines.magnitude import Magnitude
        >>> Magnitude(round_to="8")
        Traceback (most recent call last):
        ...
        shear.errors.PipelineError: pass 'magnitude': option 'round_to' is the text '8', expected int; give it as one (round_to=8)...
    """
    for o in pass_options(type(p)):
        value = getattr(p, o.name)
        try:
            converted = _convert(value, o.type)
        except _BadValue:
            raise PipelineError(
                f"pass {p.name!r}: option {o.name!r} expects {o.type_name}, got {value!r} ({type(value).__name__}){_hint(o)}"
            ) from None
        if isinstance(value, str) and not _admits_text(o.type):
            raise PipelineError(
                f"pass {p.name!r}: option {o.name!r} is the text {value!r}, expected {o.type_name}; give it as one "
                f"({o.name}={converted!r}), not a string (a pipeline string converts text itself)"
            )


def _number_in(text: str, integer: bool) -> int | float | None:
    """The finite number ``text`` reads as, else None."""
    try:
        x = int(text) if integer else float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def require_number(
    where: str,
    name: str,
    value: Any,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> Any:
    """``value`` when it is a finite number (an ``int`` with ``integer``; never a bool or text) within
    the bounds, else a :class:`PipelineError` naming ``where``, the option, the range and the value.

    Example:
        >>> require_number("plan", "ratio", 0.2, low=0, high=1, open_low=True, open_high=True)
        0.2
        >>> require_number("plan", "ratio", "0.2", low=0, high=1)
        Traceback (most recent call last):
        ...
        shear.errors.PipelineError: plan: ratio must be in [0, 1] (a number), got '0.2' (str); give it as a number, e.g. ratio=0.2
    """
    def show(bound: float) -> str:
        return f"{bound:,}" if isinstance(bound, int) and abs(bound) >= 10**6 else f"{bound:g}"

    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        span = f" in {'(' if open_low else '['}{show(low)}, {show(high)}{')' if open_high else ']'}"
    elif low is not None:
        span = f" {'>' if open_low else '>='} {show(low)}"
    elif high is not None:
        span = f" {'<' if open_high else '<='} {show(high)}"
    else:
        span = ""
    ok = not isinstance(value, bool) and (isinstance(value, int) or (not integer and isinstance(value, float)))
    if ok:
        x = float(value) if not isinstance(value, int) else value
        ok = (isinstance(x, int) or math.isfinite(x)) and not (
            low is not None and (x < low or (open_low and x == low))
        ) and not (high is not None and (x > high or (open_high and x == high)))
    if not ok:
        hint = ""
        if isinstance(value, str):
            x = _number_in(value, integer)
            hint = "; give it as a number" + (f", e.g. {name}={x!r}" if x is not None else "")
        raise PipelineError(f"{where}: {name} must be{span} ({kind}), got {value!r} ({type(value).__name__}){hint}")
    return value


def build_pass(cls: type[Pass], options: Mapping[str, Any] | None = None) -> Pass:
    """Instantiate ``cls`` from option values (text or typed), checking names and types.

    Unknown options raise :class:`PipelineError` listing the valid ones, closest first; an error
    raised by the pass's own validation (``__post_init__``) is wrapped likewise.
    """
    from shear.passes.registry import closest_first

    options = dict(options or {})
    infos = {o.name: o for o in pass_options(cls)}
    unknown = [k for k in options if k not in infos]
    if unknown:
        valid = closest_first(unknown[0], list(infos))
        listing = ", ".join(f"{n}: {infos[n].type_name}" for n in valid) or "(it takes no options)"
        raise PipelineError(f"pass {cls.name!r} has no option {unknown[0]!r}. Valid options (closest first): {listing}")
    missing = [n for n, o in infos.items() if o.required and n not in options]
    if missing:
        raise PipelineError(f"pass {cls.name!r}: missing required option(s) {', '.join(missing)}")
    kwargs = {k: convert_option(cls.name, infos[k], v) for k, v in options.items()}
    try:
        return cls(**kwargs)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"pass {cls.name!r} rejected its options {kwargs}: {e}") from e


_BARE = re.compile(r"^[A-Za-z0-9_.+\-/:@]+$")


def format_value(value: Any) -> str:
    """A value spelled so that :func:`~shear.passes.pipeline.parse_pipeline` reads it back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return format_value(value.value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if _BARE.match(text) and text.lower() not in _TRUE | _FALSE | _NONE:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_pass(p: Pass) -> str:
    """``name{opt=value,...}`` with the options that differ from their defaults."""
    parts = []
    for o in pass_options(type(p)):
        value = getattr(p, o.name)
        if o.required or not _same(value, o.default):
            parts.append(f"{o.name}={format_value(value)}")
    return f"{p.name}{{{','.join(parts)}}}" if parts else p.name


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - e.g. tensors; treat as different
        return False


set_option_check(check_fields)
