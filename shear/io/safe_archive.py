"""Reading a ``torch.export`` program archive (``program.pt2``) as data, never as code.

``torch.export.load`` trusts its archive: a constant whose ``path_name`` starts with ``opaque_obj_``
goes to ``pickle.loads``, one with ``custom_obj_`` to torch's TorchScript unpickler, an entry with
``use_pickle`` or a legacy ``<model>.pt`` weights record to ``torch.load(weights_only=False)``;
the program's ``guards_code`` is ``exec``-ed by ``program.module()``, its symbolic shape strings go
to ``sympy.sympify`` (an ``eval``), and a node target such as ``torch.os.system`` resolves to that
function. Record lookups ignore case (``OPAQUE_OBJ_0`` is found as ``opaque_obj_0``).

So :func:`check_program_archive` reads the archive itself, with torch's own record reader, and
accepts exactly what ``shear.save`` writes, refusing everything else with
:class:`~shear.errors.CheckpointError` before ``torch.export.load`` opens the file:

* the record names, compared in full and case-insensitively: the archive's fixed records
  (:data:`FIXED_RECORDS`), one program ``models/model.json``, its sample inputs, the two payload
  configs, and exactly the tensor records those configs name (``weight_<n>``, ``tensor_<n>``);
* each payload config as a whole: every entry a plain tensor stored by path (``use_pickle`` false,
  a complete ``tensor_meta``), no other key;
* the program JSON: every node target an ATen op or a Python operator (:data:`OPERATORS`), every
  symbolic expression and guard within a small grammar of sympy constructors and comparisons;
* the sample inputs: tensors and plain values only (torch's ``weights_only`` reader).

:func:`no_pickle` then closes the remaining doors while torch reads the file: ``torch.load`` is
``weights_only=True`` and the archive loader's ``pickle`` and TorchScript unpickler raise.
``tests/test_safety_load.py`` lists every unpickling, ``exec`` and ``sympify`` call site of torch's
export loader and fails when a new one appears that this module has not been reviewed against.

Example:
    >>> import io, zipfile, pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "program.pt2"
    >>> with zipfile.ZipFile(f, "w") as z:
    ...     z.writestr("program/custom_obj_0", b"...")
    >>> try:
    ...     check_program_archive(f)
    ... except CheckpointError as e:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import ast
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from shear.errors import CheckpointError

__all__ = [
    "ROOT",
    "FIXED_RECORDS",
    "OPERATORS",
    "SYMPY_NAMES",
    "check_program_archive",
    "no_pickle",
    "read_json_bytes",
    "read_json_file",
]

ROOT = "program"
"""The folder every record of a ``program.pt2`` lives in (torch names it after the file)."""

MODEL = "model"
"""The one program name ``torch.export.save`` writes."""

FIXED_RECORDS = (
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
    f"models/{MODEL}.json", f"data/sample_inputs/{MODEL}.pt",
    f"data/weights/{MODEL}_weights_config.json", f"data/constants/{MODEL}_constants_config.json",
)
"""Records (below :data:`ROOT`) every archive ``shear.save`` writes holds; the only others allowed are
the tensor records its two payload configs name."""

_PAYLOADS = {"weights": ("data/weights/", re.compile(r"weight_\d{1,9}")),
             "constants": ("data/constants/", re.compile(r"tensor_\d{1,9}"))}
"""Payload config -> (record folder, the ``path_name`` of a tensor stored by path)."""

_ENTRY_KEYS = {"path_name", "is_param", "use_pickle", "tensor_meta"}
_META_KEYS = {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"}

OPERATORS = frozenset({
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "xor",
})
"""Python ``operator`` functions a node may call (``_operator.<name>``): size arithmetic."""

_ATEN = re.compile(r"torch\.ops\.aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_SYM_FUNCTIONS = re.compile(r"torch\.sym_(max|min|float|int|not|ite|sum|sqrt)")

SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Mul", "Add", "Pow", "Mod", "Max", "Min", "Abs",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "BooleanTrue", "BooleanFalse",
    "true", "false", "oo", "zoo", "nan", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "sym_float", "sym_int", "sym_max", "sym_min",
    "sym_sqrt", "sym_ite", "floor", "ceiling", "sqrt",
})
"""Names a symbolic-shape expression or a guard may call: sympy and torch size functions, no others."""

_GUARD_ATTRS = frozenset({"size", "stride", "storage_offset", "dim", "isnan", "isinf", "inf"})
_GUARD_NAMES = frozenset({"L", "math", "inf"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

MAX_JSON_BYTES = 1 << 30
"""The largest JSON record read from an archive (a program of a very large model is far smaller)."""
MAX_EXPRESSION = 4096
"""The longest symbolic expression or guard accepted, in characters."""


_RESAVE = "Re-save the model with shear.save"


def _refuse(file: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: {what}; shear loads only tensor data and the ATen program it saved. The file was not written "
        "by shear.save or was edited: re-save the model with shear.save from a trusted source"
    )


def read_json_bytes(data: bytes, where: str, max_bytes: int = MAX_JSON_BYTES, *, fix: str = "") -> Any:
    """``data`` parsed as UTF-8 JSON, with :class:`CheckpointError` naming ``where`` for anything else:
    too large, not UTF-8, malformed, or nested too deep for the parser (a ``RecursionError`` otherwise).
    ``fix`` ends the message (what the caller's user should do); a caller that wraps the error adds its own."""
    end = f". {fix}" if fix else ""
    if len(data) > max_bytes:
        raise CheckpointError(f"{where} is corrupt or crafted: larger than {max_bytes} bytes{end}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        kind = "nested too deeply to read" if isinstance(e, RecursionError) else f"not valid UTF-8 JSON ({e})"
        raise CheckpointError(f"{where} is corrupt or crafted: {kind}{end}") from e


def read_json_file(path: Path, where: str, max_bytes: int, *, fix: str = "") -> Any:
    """The JSON file ``path`` parsed by :func:`read_json_bytes`; at most ``max_bytes + 1`` bytes are read,
    so an oversized file is refused without loading it. An unreadable file is a :class:`CheckpointError` too."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CheckpointError(f"{where} cannot be read ({e.strerror or e})" + (f". {fix}" if fix else "")) from e
    return read_json_bytes(data, where, max_bytes, fix=fix)


def _names(file: Path) -> tuple[list[str], Any]:
    """Record names below :data:`ROOT`, as torch's reader lists them, checked against the zip directory;
    and that reader."""
    try:
        with zipfile.ZipFile(file) as z:
            raw = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{file} is not a readable program archive ({e}); re-save the model") from e
    if len(raw) != len(set(raw)):
        dup = sorted({n for n in raw if raw.count(n) > 1})
        raise _refuse(file, f"the archive holds records {dup[:3]} twice")
    outside = [n for n in raw if not n.startswith(f"{ROOT}/")]
    if outside:
        raise _refuse(file, f"the archive holds {outside[:3]} outside its {ROOT}/ folder")
    names = [n[len(ROOT) + 1:] for n in raw]
    try:
        reader = torch._C.PyTorchFileReader(str(file))
        seen = sorted(reader.get_all_records())
    except RuntimeError as e:
        raise CheckpointError(f"{file} is not a readable program archive ({str(e).splitlines()[0]}); re-save the model") from e
    if seen != sorted(names):
        raise _refuse(file, "torch's record reader and the zip directory disagree on the records it holds")
    lower: dict[str, str] = {}
    for n in names:
        if n.lower() in lower:
            raise _refuse(file, f"the archive holds {lower[n.lower()]!r} and {n!r}, names that torch's lookup confuses")
        lower[n.lower()] = n
    return names, reader


def _payload(file: Path, reader: Any, kind: str, names: set[str]) -> set[str]:
    """Validate the ``kind`` payload config as a whole; the tensor records it names."""
    folder, path_name = _PAYLOADS[kind]
    record = f"{folder}{MODEL}_{kind}_config.json"
    where = f"{file}: {record}"
    doc = read_json_bytes(reader.get_record(record), where, fix=_RESAVE)
    if not isinstance(doc, dict) or set(doc) != {"config"} or not isinstance(doc["config"], dict):
        raise _refuse(file, f"{record} is not a payload config (one 'config' object)")
    used: set[str] = set()
    for fqn, entry in doc["config"].items():
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise _refuse(file, f"{record}: {fqn!r} is not a tensor entry (keys {sorted(_ENTRY_KEYS)})")
        name = entry["path_name"]
        if not isinstance(name, str) or not path_name.fullmatch(name):
            kind_of = "a pickled object" if isinstance(name, str) and "obj_" in name.lower() else "not a tensor record"
            raise _refuse(file, f"{record}: {fqn!r} is stored at {name!r}, {kind_of}, which would be loaded as code or a pickle")
        if entry["use_pickle"] is not False:
            raise _refuse(file, f"{record} stores {fqn!r} as a pickle (use_pickle), which would run code on load")
        if f"{folder}{name}" not in names:
            raise _refuse(file, f"{record}: {fqn!r} names the record {folder}{name}, which is missing (names are exact)")
        meta = entry["tensor_meta"]
        if not isinstance(meta, dict) or set(meta) != _META_KEYS or not isinstance(entry["is_param"], bool):
            raise _refuse(file, f"{record}: {fqn!r} lacks a complete tensor_meta")
        used.add(f"{folder}{name}")
    return used


def _check_expression(file: Path, text: Any, guard: bool) -> None:
    """A symbolic expression (``sympify``) or guard (``exec``) is within a small grammar of literals,
    sizes and sympy constructors; nothing else can be named, called or reached."""
    what = "guard" if guard else "symbolic expression"
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION:
        raise _refuse(file, f"a {what} of the program is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise _refuse(file, f"the {what} {text[:80]!r} does not parse") from e
    allowed: tuple[type, ...] = (
        ast.Expression, ast.Constant, ast.Call, ast.Name, ast.Load, ast.keyword, ast.BinOp, ast.UnaryOp,
        ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
    )
    if guard:
        allowed += (ast.Subscript, ast.Attribute)
    for node in ast.walk(tree):
        bad = not isinstance(node, allowed)
        if isinstance(node, ast.Name):
            bad = node.id not in SYMPY_NAMES and node.id not in (_GUARD_NAMES if guard else ()) and not (
                not guard and re.fullmatch(r"[a-z]{1,8}\d{1,9}", node.id)
            )
        elif isinstance(node, ast.Attribute):
            bad = node.attr not in _GUARD_ATTRS
        elif isinstance(node, ast.Call):
            f = node.func
            bad = not ((isinstance(f, ast.Name) and f.id in SYMPY_NAMES) or (guard and isinstance(f, ast.Attribute)))
        elif isinstance(node, ast.Constant):
            v = node.value
            bad = not (isinstance(v, (bool, int, float)) or v is None or (isinstance(v, str) and _NAME.fullmatch(v)))
        if bad:
            raise _refuse(file, f"the {what} {text[:80]!r} names or calls something other than sizes and sympy "
                                f"constructors ({type(node).__name__}), which would run as code")


def _check_program(file: Path, doc: Any) -> None:
    """Walk the whole serialized program: node targets, operator arguments, expressions and guards."""
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise _refuse(file, f"models/{MODEL}.json is not a serialized program")
    guards = doc.get("guards_code", [])
    if not isinstance(guards, list):
        raise _refuse(file, "the program's guards_code is not a list")
    for g in guards:
        _check_expression(file, g, guard=True)
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in ("target", "as_operator") and not isinstance(value, (dict, list)):
                ok = isinstance(value, str) and (
                    _ATEN.fullmatch(value) or _SYM_FUNCTIONS.fullmatch(value)
                    or (value.startswith("_operator.") and value.removeprefix("_operator.") in OPERATORS)
                )
                if not ok:
                    raise _refuse(file, f"the program calls {str(value)[:80]!r}, which is not an ATen op or size arithmetic")
            elif key == "expr_str":
                _check_expression(file, value, guard=False)
            elif key == "as_graph":
                raise _refuse(file, "the program holds a nested graph (a higher-order op), which shear never writes")
            else:
                stack.append(value)


def _check_sample_inputs(file: Path, data: bytes) -> None:
    """The sample inputs must read with torch's ``weights_only`` unpickler as ``(args, kwargs)``."""
    try:
        value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any refusal of the weights-only reader
        raise _refuse(
            file, f"the sample inputs (data/sample_inputs/{MODEL}.pt) are not plain tensors: the archive asks to "
            f"unpickle an object, which could run code ({type(e).__name__})"
        ) from e
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) and isinstance(value[1], dict)):
        raise _refuse(file, f"the sample inputs are a {type(value).__name__}, not (args, kwargs)")


def check_program_archive(file: Path) -> None:
    """Refuse a ``program.pt2`` that holds anything but what ``shear.save`` writes (see the module doc):
    pickled or opaque objects, ``use_pickle`` payloads, legacy pickled weights, compiled code, unknown
    records or case variants of known ones, code in the program's guards or shape expressions, calls of
    anything but ATen ops. Raises :class:`CheckpointError` naming the record and the fix."""
    file = Path(file)
    names, reader = _names(file)
    for n in names:
        leaf = n.lower()
        if "opaque_obj_" in leaf or "custom_obj_" in leaf or (leaf.startswith("data/") and leaf.endswith(".pt")
                                                              and n != f"data/sample_inputs/{MODEL}.pt"):
            raise _refuse(file, f"the archive holds {ROOT}/{n}, which would be loaded as code or a pickle")
    present = set(names)
    missing = [n for n in FIXED_RECORDS if n not in present]
    if missing:
        raise _refuse(file, f"the archive lacks {missing[:3]}")
    fixed = {"archive_format": b"pt2", "archive_version": b"0"}
    for record, value in fixed.items():
        if reader.get_record(record) != value:
            raise _refuse(file, f"{record} is not {value.decode()!r}")
    used = _payload(file, reader, "weights", present) | _payload(file, reader, "constants", present)
    unknown = sorted(present - used - set(FIXED_RECORDS))
    if unknown:
        raise _refuse(file, f"the archive holds {[f'{ROOT}/{n}' for n in unknown[:3]]}, records shear never writes "
                            "(pickles, compiled code or extra files)")
    program = read_json_bytes(reader.get_record(f"models/{MODEL}.json"), f"{file}: models/{MODEL}.json", fix=_RESAVE)
    _check_program(file, program)
    _check_sample_inputs(file, reader.get_record(f"data/sample_inputs/{MODEL}.pt"))


class _NoPickle:
    """Stands in for the ``pickle`` module inside torch's archive loader: every load refuses."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def _refuse(self, *_a: object, **_k: object) -> Any:
        raise CheckpointError(f"{self.file}: the archive asks to unpickle an object, which could run code; refused")

    load = loads = Unpickler = _refuse

    def __getattr__(self, name: str) -> Any:
        import pickle

        return getattr(pickle, name)


_patch_lock = threading.RLock()
"""Held for the whole of a :func:`no_pickle` block: its patches are process-wide, so two threads loading
at once must not interleave them (one would restore the other's patch as the original for good)."""


@contextmanager
def no_pickle(file: Path) -> Iterator[None]:
    """Within the block, ``torch.load`` reads only tensors (``weights_only=True``), whatever a caller asks,
    and the archive loader's ``pickle.loads`` and TorchScript object unpickler raise
    :class:`CheckpointError`. A second guard behind :func:`check_program_archive`, for the whole load.
    The patches are process-wide: one block runs at a time (other threads' blocks wait)."""
    from torch.export.pt2_archive import _package

    refuse = _NoPickle(file)
    with _patch_lock:
        real_load, real_pickle, real_obj = torch.load, _package.pickle, torch._C._pickle_load_obj  # type: ignore[attr-defined]

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("weights_only") is False:
                refuse.loads()
            kwargs["weights_only"] = True
            return real_load(*args, **kwargs)

        torch.load = guarded  # type: ignore[assignment]
        _package.pickle = refuse  # type: ignore[assignment]
        torch._C._pickle_load_obj = refuse.loads  # type: ignore[attr-defined]
        try:
            yield
        finally:
            torch.load = real_load
            _package.pickle = real_pickle
            torch._C._pickle_load_obj = real_obj  # type: ignore[attr-defined]

