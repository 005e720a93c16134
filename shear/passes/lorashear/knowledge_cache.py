"""A directory of knowledge-distribution results, keyed by what determines them.

Knowledge distribution is the costliest analysis of the LoRAShear pipeline (one perplexity
evaluation per node group; its share of a run is in docs/results/ablation.md) and its
result does not depend on the pruning ratio, the schedule or the recovery that follow. A run with
``knowledge-distribution{cache_dir=...}`` stores its result as JSON under a key made of the model's
weights (adapters left out: their random start does not change what a node group is worth to the
base model, and the key still sees the peft names), the validation and training text, the pass's
options and shear's version; a later run with the same key loads the result instead of measuring
again. The file holds numbers and names only (JSON, no pickle), and is data from disk: it is read
field by field against a fixed schema and checked against the node groups the run would analyse
(:func:`load_result`); a file that fails is ignored with a warning and the result measured again.

Example:
    >>> import tempfile, pathlib
    >>> from shear.passes.lorashear.knowledge_results import KnowledgeDistribution, NodeGroupDeviation
    >>> e = NodeGroupDeviation(0, "mlp", "basic", (0,), 4, 12.0, 2.0, 0.2, unprunable=True)
    >>> kd = KnowledgeDistribution(10.0, {"a": 10.0}, (e,), (0,), frozenset({0}), frozenset({0}), 0.5, 0.1, "random")
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "kd.json"
    >>> save_result(path, kd); load_result(path) == kd
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, cast

from torch import nn

from shear.errors import OutputError, PassError
from shear.io.outputs import atomic_file
from shear.passes.base import Pass
from shear.passes.lorashear.knowledge_results import KnowledgeDistribution, NodeGroupDeviation
from shear.training.fingerprint import RunFingerprint, tensor_digest

__all__ = ["cache_key", "save_result", "load_result", "FORMAT", "MAX_BYTES", "Expected", "with_cache", "NEXT_TO_OUTPUT"]

FORMAT = "shear-knowledge-distribution"

NEXT_TO_OUTPUT = "shear-kd-cache"
"""The cache folder ``shear prune`` keeps next to its output (in the output's parent folder), so every
run that writes there, at any ratio, finds the results of the others."""


def with_cache(
    passes: Sequence[Pass], output: str | os.PathLike[str], choice: str | None, inputs: Iterable[str | None] = ()
) -> tuple[list[Pass], str]:
    """``passes`` with the knowledge-distribution pass's ``cache_dir`` set to ``choice`` (``None``: the
    :data:`NEXT_TO_OUTPUT` folder next to ``output``; ``"none"``: no cache), and a line saying where.
    The folder may not be or lie inside the output (the save replaces it) or an input.

    Example:
        >>> from shear.passes import resolve_pipeline
        >>> passes, note = with_cache(resolve_pipeline("knowledge-distribution"), "/tmp/runs/out", None)
        >>> passes[0].cache_dir
        '/tmp/runs/shear-kd-cache'
    """
    if choice is not None and choice.strip().lower() == "none":
        return list(passes), "knowledge distribution: not cached (--kd-cache none)"
    out = Path(os.path.realpath(Path(output).expanduser()))
    folder = Path(os.path.realpath(Path(choice).expanduser())) if choice else out.parent / NEXT_TO_OUTPUT
    for what, other in [("the output", out)] + [
        ("the input", Path(os.path.realpath(Path(i).expanduser()))) for i in inputs if i and Path(i).exists()
    ]:
        if folder == other or other in folder.parents:
            raise OutputError(
                f"the knowledge-distribution cache {folder} is {what} or inside it ({other}); give another folder "
                "with --kd-cache DIR (or --kd-cache none)"
            )
    kept = [
        replace(cast(Any, p), cache_dir=str(folder))
        if p.name == "knowledge-distribution" and getattr(p, "cache_dir", None) is None
        else p
        for p in passes
    ]
    return kept, (
        f"knowledge distribution: cached in {folder} (a rerun with the same model, data and budget reuses it at any "
        "--ratio; --kd-cache none: no cache)"
    )


def cache_key(model: nn.Module, data: Any, options: dict[str, Any]) -> str:
    """Hex key (24 digits) of a knowledge-distribution run: weights, text, options, shear version."""
    text = tensor_digest(
        [(f"validation/{k}", v) for k, v in sorted(data.validation.items())]
        + [(f"train/{k}", v) for k, v in sorted(data.train.items())]
    )
    fp = RunFingerprint.of(model, data=text, options=options)
    return hashlib.sha256(json.dumps(fp.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_result(path: Path, kd: KnowledgeDistribution) -> None:
    """Write ``kd`` to ``path`` as JSON, atomically (:func:`shear.io.outputs.atomic_file`: a hidden
    sibling, then a rename that replaces only the entry that was there when the write began)."""
    doc = asdict(kd)
    for key in ("unprunable_node_groups", "unprunable_groups"):
        doc[key] = sorted(doc[key])
    doc["figures"] = [str(f) for f in doc["figures"]]
    doc["format"] = FORMAT
    with atomic_file(path) as tmp:  # an unwritable cache_dir (a file, full disk): OutputError naming it
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))


_TOP = frozenset({
    "format", "base_ppl", "base_ppl_by_source", "entries", "ranking", "unprunable_node_groups",
    "unprunable_groups", "ratio", "gamma", "proxy", "figures",
})
_ENTRY = frozenset({
    "node_group", "name", "kind", "pruning_groups", "structures", "ppl", "deviation", "relative", "unprunable",
})
_PROXIES = frozenset({"magnitude", "activation", "random", "saliency"})
MAX_BYTES = 64 << 20
"""A cache file larger than this is not read (a real one holds a few kB per node group)."""

Expected = Mapping[int, tuple[str, str, tuple[int, ...]]]
"""Analysed node group id -> (name, kind, pruning group ids), as the pass finds them in the graph."""


class _Bad(Exception):
    """Why a cache document is not a result of this run (turned into a :class:`PassError`)."""


def _int(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise _Bad(f"{where} must be a non-negative integer, got {value!r}"[:200])
    return value


def _number(value: Any, where: str, *, inf: bool = False, positive: bool = False) -> float:
    """A JSON number (never a bool): finite, or ``+inf`` where a measurement may be non-finite."""
    if type(value) not in (int, float):
        raise _Bad(f"{where} must be a number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:  # an integer past float range (JSON allows 10**400)
        raise _Bad(f"{where} must be a finite number, got an integer too large for a float") from None
    if math.isnan(x) or x == -math.inf or (x == math.inf and not inf):
        raise _Bad(f"{where} must be a finite number, got {x}")
    if positive and not x > 0:
        raise _Bad(f"{where} must be positive, got {x}")
    return x


def _ints(value: Any, where: str) -> tuple[int, ...]:
    if type(value) is not list:
        raise _Bad(f"{where} must be a list of integers, got {type(value).__name__}")
    return tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def _str(value: Any, where: str) -> str:
    if type(value) is not str:
        raise _Bad(f"{where} must be a string, got {type(value).__name__}")
    return value


def _keys(doc: Any, keys: frozenset[str], where: str) -> dict[str, Any]:
    if type(doc) is not dict:
        raise _Bad(f"{where} must be a JSON object, got {type(doc).__name__}")
    if set(doc) != keys:
        extra, missing = sorted(set(doc) - keys), sorted(keys - set(doc))
        raise _Bad(f"{where} has unknown fields {extra} and lacks fields {missing}"[:300])
    return doc


def _entry(doc: Any, i: int) -> NodeGroupDeviation:
    where = f"entries[{i}]"
    e = _keys(doc, _ENTRY, where)
    kind = _str(e["kind"], f"{where}.kind")
    if kind not in ("basic", "composed"):
        raise _Bad(f"{where}.kind must be 'basic' or 'composed', got {kind!r}"[:200])
    if type(e["unprunable"]) is not bool:
        raise _Bad(f"{where}.unprunable must be true or false, got {e['unprunable']!r}"[:200])
    return NodeGroupDeviation(
        node_group=_int(e["node_group"], f"{where}.node_group"),
        name=_str(e["name"], f"{where}.name"),
        kind=kind,
        pruning_groups=_ints(e["pruning_groups"], f"{where}.pruning_groups"),
        structures=_int(e["structures"], f"{where}.structures"),
        ppl=_number(e["ppl"], f"{where}.ppl", inf=True, positive=True),
        deviation=_number(e["deviation"], f"{where}.deviation", inf=True),
        relative=_number(e["relative"], f"{where}.relative", inf=True),
        unprunable=e["unprunable"],
    )


def _result(doc: Any) -> KnowledgeDistribution:
    """The document as a :class:`KnowledgeDistribution`, every field of its exact type and range."""
    d = _keys(doc, _TOP, "the file")
    if d["format"] != FORMAT:
        raise _Bad(f"not a {FORMAT} file")
    by_source = d["base_ppl_by_source"]
    if type(by_source) is not dict or not by_source:
        raise _Bad("base_ppl_by_source must be a non-empty object of source -> perplexity")
    if type(d["entries"]) is not list or not d["entries"]:
        raise _Bad("entries is empty or not a list: no node group was analysed")
    proxy = _str(d["proxy"], "proxy")
    if proxy not in _PROXIES:
        raise _Bad(f"proxy must be one of {sorted(_PROXIES)}, got {proxy!r}"[:200])
    ratio, gamma = _number(d["ratio"], "ratio"), _number(d["gamma"], "gamma")
    if not (0.0 < ratio < 1.0 and 0.0 <= gamma <= 1.0):
        raise _Bad(f"ratio must be in (0, 1) and gamma in [0, 1], got {ratio}, {gamma}")
    figures = d["figures"]
    if type(figures) is not list:
        raise _Bad("figures must be a list of paths")
    try:
        return KnowledgeDistribution(
            base_ppl=_number(d["base_ppl"], "base_ppl", positive=True),
            base_ppl_by_source={
                k: _number(v, f"base_ppl_by_source[{k!r}]", positive=True)
                for k, v in by_source.items()
            },
            entries=tuple(_entry(e, i) for i, e in enumerate(d["entries"])),
            ranking=_ints(d["ranking"], "ranking"),
            unprunable_node_groups=frozenset(_ints(d["unprunable_node_groups"], "unprunable_node_groups")),
            unprunable_groups=frozenset(_ints(d["unprunable_groups"], "unprunable_groups")),
            ratio=ratio,
            gamma=gamma,
            proxy=proxy,
            figures=tuple(Path(_str(f, "figures[]")) for f in figures),
        )
    except PassError as e:  # the dataclass's own consistency checks (ranking, unprunable node groups)
        raise _Bad(str(e).removeprefix("KnowledgeDistribution: ")) from None


def _matches(kd: KnowledgeDistribution, expected: Expected) -> None:
    """The cached node groups are exactly the ones this run analyses, each with its name, kind and groups."""
    got = {e.node_group: e for e in kd.entries}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise _Bad(
            f"it does not hold the node groups this graph analyses (missing {missing[:10]}, not analysed {extra[:10]})"
        )
    for ng, (name, kind, groups) in expected.items():
        e = got[ng]
        if (e.name, e.kind, tuple(e.pruning_groups)) != (name, kind, tuple(groups)):
            raise _Bad(
                f"node group {ng} is {e.name!r} ({e.kind}, pruning groups {list(e.pruning_groups)[:10]}) in the file "
                f"but {name!r} ({kind}, pruning groups {list(groups)[:10]}) in the graph"
            )


def load_result(path: Path, expected: Expected | None = None) -> KnowledgeDistribution:
    """The :class:`KnowledgeDistribution` stored at ``path``, checked field by field (exact fields and
    types, finite numbers, a consistent ranking) and, with ``expected``, against the node groups this
    run analyses; else a :class:`PassError` naming the file and why (the pass then measures again).

    Example:
        >>> load_result(Path("/nonexistent/kd.json"))
        Traceback (most recent call last):
        ...
        shear.errors.PassError: knowledge-distribution: the cached result /nonexistent/kd.json is not usable (...)...
    """

    def unusable(why: object) -> PassError:
        return PassError(
            f"knowledge-distribution: the cached result {path} is not usable ({why}); "
            "the pass ignores it and measures again (or delete the file)"
        )

    try:
        if path.stat().st_size > MAX_BYTES:
            raise unusable(f"larger than {MAX_BYTES >> 20} MiB")
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise unusable(f"cannot be read as JSON: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        kd = _result(doc)
        if expected is not None:
            _matches(kd, expected)
    except _Bad as e:
        raise unusable(e) from None
    except RecursionError:
        raise unusable("nested too deep") from None
    return kd
