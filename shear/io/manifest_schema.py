"""The schema of ``shear.json``: every field of a saved model's manifest, checked before it is used.

The manifest decides what :func:`shear.load` builds (class, tensor shapes and dtypes, aliases,
attributes set on submodules), so a field edited by hand or by an attacker must not change the
model's function unnoticed. :func:`check_manifest` checks it field by field: types, ranges, name
syntax, that names refer to each other (aliases to saved tensors, weight shards to listed files),
and that no unknown field is present. :data:`MODULE_ATTRS` says which attribute a module of a given
kind may receive (only an RMS norm's epsilon, under its spec's own name), and
:func:`check_module_attrs` checks each value against the model and its ``config.json``.

Example:
    >>> try:
    ...     check_manifest({"format": "shear-checkpoint", "version": 2, "evil": 1}, "shear.json")
    ... except CheckpointError as e:
    ...     print("refused")
    refused
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import torch
from torch import nn

from shear.errors import CheckpointError

__all__ = [
    "CONFIG_FILES",
    "MODULE_ATTRS",
    "MAX_NORM_WIDTH",
    "check_manifest",
    "check_module_attrs",
    "file_list_problem",
    "is_int",
    "TARGETS",
]


def _is_dtype(name: Any) -> bool:
    """``name`` is a torch dtype's name (``float32``, ``bfloat16``, ...)."""
    return isinstance(name, str) and bool(_CLASS.fullmatch(name)) and isinstance(getattr(torch, name, None), torch.dtype)


MAX_NORM_WIDTH = 1 << 20
"""Widest a norm can have been before pruning: bounds the epsilon rescale ``eps * d / d'``."""

MODULE_ATTRS: dict[str, Callable[[nn.Module], str | None]] = {}
"""Module kind -> the one attribute a manifest may set on a module of that kind (None: none).
Filled below: an RMS norm may receive its epsilon (rescaled when its width shrank), under the
attribute name its :class:`~shear.graph.modules.rms_norm_spec.RmsNormSpec` gives; nothing else may be set."""


def _rms_eps(module: nn.Module) -> str | None:
    from shear.codegen.module_rules import find_rms_norm

    spec = find_rms_norm(module)
    return spec.eps_attr if spec is not None else None


MODULE_ATTRS["rms_norm"] = _rms_eps

TARGETS = ("hf", "nas", "shear")
"""The serving formats a folder is written in (``target``; :mod:`shear.io.folder_formats`)."""
CONFIG_FILES = ("config.json", "shear_config.json")
"""Where a folder keeps the transformers config :func:`shear.load` builds from (``config_file``): ``config.json``,
or ``shear_config.json`` when ``config.json`` is for other readers (Nemotron-NAS) or refuses stock transformers."""
_MAX_NOTE = 4000

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,511}")
_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,15}")
_SHA = re.compile(r"[0-9a-f]{64}")
_MAX_DIM = 1 << 40


def _fail(where: str, field: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: field {field!r} {what}; the manifest is damaged or was edited. Re-save the model with shear.save"
    )


def is_int(v: Any, lo: int = 0, hi: int = _MAX_DIM) -> bool:
    """``v`` is an integer (not a bool) in ``[lo, hi]``."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _names(where: str, field: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and _NAME.fullmatch(x) for x in v):
        raise _fail(where, field, "must be a list of tensor or module names")
    return v


def _mapping(where: str, field: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and _NAME.fullmatch(k) for k in v):
        raise _fail(where, field, "must be an object keyed by tensor or module names")
    return v


def file_list_problem(v: Any) -> str | None:
    """What is wrong with ``v`` as a file list ``{relative name: {size, sha256}}`` (a manifest's or a
    training record's ``files``), or None. A name is relative and stays inside the folder (no ``..``)."""
    if not isinstance(v, dict):
        return "must be an object: file -> {size, sha256}"
    for f, info in v.items():
        if not isinstance(f, str) or not f or len(f) > 1024 or f.startswith("/") or ".." in PurePosixPath(f).parts:
            return f"names {f!r}, not a relative file name inside the folder"
        if not isinstance(info, dict) or set(info) != {"size", "sha256"}:
            return f"entry {f!r} must hold exactly size and sha256"
        if not is_int(info["size"], 0, 1 << 50) or not (isinstance(info["sha256"], str) and _SHA.fullmatch(info["sha256"])):
            return f"entry {f!r} has a size or sha256 that is not a count or a hex digest"
    return None


def _graph_module(where: str, v: Any) -> None:
    if not isinstance(v, dict) or set(v) != {"file", "constants"}:
        raise _fail(where, "graph_module", "must hold exactly file and constants")
    if v["file"] != "program.pt2":
        raise _fail(where, "graph_module", f"names the program {v['file']!r}; it must be program.pt2")
    consts = v["constants"]
    if not isinstance(consts, dict) or not all(isinstance(k, str) and _CLASS.fullmatch(k) for k in consts):
        raise _fail(where, "graph_module.constants", "must be an object keyed by argument names")
    for k, c in consts.items():
        if not (c is None or isinstance(c, (bool, int, str)) or (isinstance(c, float) and math.isfinite(c))):
            raise _fail(where, f"graph_module.constants.{k}", "must be a plain value (bool, number, string or null)")
        if isinstance(c, str) and len(c) > 256:
            raise _fail(where, f"graph_module.constants.{k}", "is a string longer than 256 characters")


def _module_attrs(where: str, v: Any) -> None:
    for mod, attrs in _mapping(where, "module_attrs", v).items():
        if not isinstance(attrs, dict) or len(attrs) != 1:
            raise _fail(where, f"module_attrs.{mod}", "must hold exactly one attribute (a norm's epsilon)")
        for k, x in attrs.items():
            if not isinstance(k, str) or not _CLASS.fullmatch(k) or k.startswith("_"):
                raise _fail(where, f"module_attrs.{mod}", f"names the attribute {k!r}, not a plain attribute name")
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not 0 < x <= 1:
                raise _fail(where, f"module_attrs.{mod}.{k}", f"is {x!r}; a norm's epsilon is a number in (0, 1]")


def _peft(where: str, v: Any) -> None:
    if v is None:
        return
    if not isinstance(v, dict) or set(v) != {"dir", "requires_grad"} or v["dir"] != "adapter":
        raise _fail(where, "peft", "must be null or exactly {dir: 'adapter', requires_grad: [...]}")
    _names(where, "peft.requires_grad", v["requires_grad"])


def _target(where: str, manifest: dict[str, Any]) -> None:
    """``target`` is one of :data:`TARGETS`; ``config_file`` one of :data:`CONFIG_FILES` (``shear_config.json``
    for ``nas``; the file list check finds it missing); ``target_note`` a short string."""
    target = manifest.get("target", "shear")
    if target not in TARGETS:
        raise _fail(where, "target", f"is {target!r}; it must be one of {', '.join(TARGETS)}")
    note = manifest.get("target_note", "")
    if not isinstance(note, str) or len(note) > _MAX_NOTE:
        raise _fail(where, "target_note", f"must be a string of at most {_MAX_NOTE} characters")
    if "graph_module" in manifest:
        if target != "shear":
            raise _fail(where, "target", "must be shear for a saved program")
        return
    config_file = manifest.get("config_file", "config.json")
    if config_file not in CONFIG_FILES:
        raise _fail(where, "config_file", f"is {config_file!r}; it must be one of {', '.join(CONFIG_FILES)}")
    if target == "nas" and (config_file != "shear_config.json" or not manifest["transformers"]):
        raise _fail(where, "target", "is nas, which needs a transformers model whose config is in shear_config.json")


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` checked field by field against the schema of ``shear.json`` (``where`` names the
    file in messages); returns it. Unknown fields, wrong types, out-of-range values and names that
    refer to nothing are :class:`CheckpointError`. Version and format are checked by the caller."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where} is not a JSON object; re-save the model with shear.save")
    graph = "graph_module" in manifest
    common = {"format", "version", "class", "class_module", "transformers", "requires_grad", "files", "target",
              "target_note"}
    fields = common | ({"graph_module"} if graph else
                       {"shapes", "dtypes", "aliases", "module_attrs", "none_modules", "peft", "weights", "config_file"})
    optional = {"weights", "none_modules", "target", "target_note", "config_file"}
    unknown = sorted(set(manifest) - fields)
    if unknown:
        raise _fail(where, unknown[0], f"is not a field of a {'graph-module ' if graph else ''}shear manifest "
                                       f"(known: {sorted(fields)})")
    missing = sorted(fields - optional - set(manifest))
    if missing:
        raise CheckpointError(f"{where} lacks {missing}; the manifest is damaged, re-save the model")
    if not (isinstance(manifest["class"], str) and _CLASS.fullmatch(manifest["class"])):
        raise _fail(where, "class", "must be a class name (letters, digits, underscores)")
    if not (isinstance(manifest["class_module"], str) and _MODULE.fullmatch(manifest["class_module"])):
        raise _fail(where, "class_module", "must be a dotted module name")
    if not isinstance(manifest["transformers"], bool):
        raise _fail(where, "transformers", "must be true or false")
    _names(where, "requires_grad", manifest["requires_grad"])
    problem = file_list_problem(manifest["files"])
    if problem:
        raise _fail(where, "files", problem)
    _target(where, manifest)
    if graph:
        _graph_module(where, manifest["graph_module"])
        if manifest["transformers"] or manifest["class"] != "GraphModule":
            raise _fail(where, "class", "must be GraphModule (not transformers) for a saved program")
        return manifest
    shapes = _mapping(where, "shapes", manifest["shapes"])
    for k, s in shapes.items():
        if not isinstance(s, list) or len(s) > 8 or not all(is_int(d) for d in s):
            raise _fail(where, f"shapes.{k}", "must be a list of at most 8 sizes, each a non-negative integer")
    dtypes = _mapping(where, "dtypes", manifest["dtypes"])
    if set(dtypes) != set(shapes) or not all(_is_dtype(d) for d in dtypes.values()):
        raise _fail(where, "dtypes", "must give a torch dtype name (float32, bfloat16, ...) for every tensor in shapes, "
                                     "and no other")
    aliases = _mapping(where, "aliases", manifest["aliases"])
    for a, c in aliases.items():
        if not isinstance(c, str) or c not in shapes or a in shapes:
            raise _fail(where, f"aliases.{a}", "must name a saved tensor, and not be one itself")
    _module_attrs(where, manifest["module_attrs"])
    _names(where, "none_modules", manifest.get("none_modules", []))
    _peft(where, manifest["peft"])
    if "weights" in manifest:
        w = manifest["weights"]
        if not isinstance(w, list) or not w or not all(
            isinstance(f, str) and f in manifest["files"] and "/" not in f and not f.startswith(".")
            and f.endswith(".safetensors") for f in w
        ):
            raise _fail(where, "weights", "must list plain .safetensors file names of the manifest's file list")
    return manifest


_LAYER_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")
"""A whole numeric part of a module name (``layers.3.``): stripped to group a norm with its kin in other layers."""


def check_module_attrs(model: nn.Module, attrs: dict[str, dict[str, float]], where: str) -> None:
    """Each ``module_attrs`` entry names a module of ``model`` that may take it (:data:`MODULE_ATTRS`) and
    a value its unpruned self allows: an RMS norm's epsilon, equal to the norm's own (as built from the
    config, or as the given model holds it) times ``d / d'`` for its current width ``d'`` and a whole
    former width ``d`` up to :data:`MAX_NORM_WIDTH` (the rescale erasure applies), the same ``d`` for
    the norms of one name pattern across layers (``model.layers.*.input_layernorm``: one residual stream).
    :class:`CheckpointError` otherwise. Runs before the manifest's values are set."""
    formers: dict[tuple[str, str], tuple[float, str]] = {}
    for name, values in attrs.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise _fail(where, f"module_attrs.{name}", "names no module of the model") from e
        allowed = {a for a in (rule(mod) for rule in MODULE_ATTRS.values()) if a}
        for k, v in values.items():
            if k not in allowed:
                raise _fail(where, f"module_attrs.{name}.{k}",
                            f"is not an attribute a manifest may set on a {type(mod).__name__} "
                            f"(allowed: {sorted(allowed) or 'none'})")
            base = getattr(mod, k, None)
            w = getattr(mod, "weight", None)
            width = int(w.shape[-1]) if w is not None and getattr(w, "dim", lambda: 0)() >= 1 else None
            if not isinstance(base, (int, float)) or isinstance(base, bool) or not base > 0 or width is None:
                continue
            ratio = float(v) / base
            former = ratio * width
            if ratio < 1 - 1e-6 or former > MAX_NORM_WIDTH or abs(former - round(former)) > 1e-3 * max(1.0, former):
                raise _fail(where, f"module_attrs.{name}.{k}",
                            f"is {v!r}, but the norm's unpruned epsilon (config.json's epsilon, or the given model's) "
                            f"is {base!r}; rescaled for a norm now {width} wide it is eps * d/{width} for a whole "
                            f"former width d, and {v!r} would mean d = {former:.6g}")
            seen = formers.setdefault((_LAYER_INDEX.sub("*", name), k), (former, name))
            if abs(seen[0] - former) > 1e-3 * former:
                raise _fail(where, f"module_attrs.{name}.{k}",
                            f"is {v!r}, which makes this norm {former:.6g} wide before pruning while {seen[1]}, the "
                            f"same norm of another layer, was {seen[0]:.6g}: one of the epsilons was edited")
