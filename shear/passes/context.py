"""The :class:`Context` every pass reads and writes: the model, the dense teacher, the run's
:class:`Options`, and the analyses keyed by their result type (:mod:`shear.passes.keys`).

Example:
    >>> import torch
    >>> ctx = Context(model=torch.nn.Linear(2, 2))
    >>> ctx.dense is None, ctx.options.verify
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch
from torch import nn

from shear.errors import PipelineError
from shear.graph.ir import Graph
from shear.model.target import Target

if TYPE_CHECKING:
    from shear.progress import ProgressBar, ProgressSink

from shear.passes.keys import DENSE, Key, OneOf, _key_of, canonical_key, key_name, missing_error

__all__ = ["Context", "Options"]

T = TypeVar("T")


@dataclass
class Options:
    """Settings of the run that passes read (set by ``shear.compile`` or the caller)."""

    dump_dir: Path | None = None
    """Where passes write figures (and the pass manager the IR) when they have no ``out_dir``."""
    verify: bool = True
    """False when the caller turned verification off (``shear.compile(verify=False)``): ``erase``
    then skips its own check."""
    target: Target | None = None
    """Where the model will run, resolved (:mod:`shear.model.target`): passes with ``round_to=0`` and
    ``selection=auto`` take widths and layout from it; ``None``: no target (any width, uniform)."""


_LEGACY_RETIRED: dict[str, tuple[str, ...]] = {
    "erase": ("erase",),
    "merge": ("merge-lora",),
    "lora": ("recover-dynamic", "lora"),
}
"""``ctx.results["graph-before-<x>"]`` names of the old string API -> the passes that retire such graphs."""

_MISSING = object()


class Context:
    """Everything passes share: the model being transformed, the dense teacher, options and analyses.

    Args:
        model: the model the passes transform (a pass may replace it, e.g. with a peft wrapper).
        example_inputs: positional tuple, keyword dict, or a single tensor: what the model is called with.
        data: calibration / training data (:class:`shear.data.TextData`, or a tensor of token ids).
        device: where the model was moved, when the caller asked.
        dense: the untouched dense model, teacher and reference of ``ebft``, ``recover-dynamic`` and
            distillation (``shear.compile`` stores the caller's model unless ``inplace=True``).
        options: settings of the run (:class:`Options`).
        progress_sink: where progress bars go (set by the pass manager / CLI); ``None`` renders nothing.
        results: deprecated, the old string-keyed spelling; applied through :attr:`results`.

    Analyses are keyed by their result type (``ctx.put(kd)``, ``ctx.get(KnowledgeDistribution)``),
    or by a kebab-case name for a result without a type of its own (``ctx.put(chosen, "random")``).
    Each remembers the graph that was current when it was stored (:meth:`basis`), so a pass can map
    group ids of an analysis made on an older graph onto the current one.

    Example:
        >>> ctx = Context(model=torch.nn.Linear(2, 2))
        >>> ctx.has(Graph), ctx.find(Graph) is None
        (False, True)
        >>> ctx.put({0: [1]}, "random"); ctx.get("random")
        {0: [1]}
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        data: Any = None,
        device: torch.device | None = None,
        *,
        dense: nn.Module | None = None,
        options: Options | None = None,
        progress_sink: ProgressSink | None = None,
        results: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.data = data
        self.device = device
        self.dense = dense
        self.options = options if options is not None else Options()
        self.progress_sink = progress_sink
        self.analyses: dict[Key, Any] = {}
        """Analysis results by key (result type, or name for an untyped result)."""
        self.retired: list[tuple[str, Graph]] = []
        """Graphs that stopped describing the model, oldest first, with the pass that made them stale."""
        self.warnings: list[str] = []
        self._basis: dict[Key, Any] = {}
        if results:
            self.results.update(results)

    def __repr__(self) -> str:
        keys = ", ".join(key_name(k) for k in self.analyses)
        return f"Context(model={type(self.model).__name__}, analyses=[{keys}], dense={self.dense is not None})"

    # -- typed analyses ------------------------------------------------------------------------

    @property
    def graph(self) -> Graph | None:
        """The traced IR of ``ctx.model`` (``None`` before discovery, or after a pass made it stale)."""
        return self.analyses.get(Graph)

    @graph.setter
    def graph(self, graph: Graph | None) -> None:
        if graph is None:
            self.pop(Graph)
        else:
            self.put(graph, Graph)

    def has(self, key: Key | OneOf) -> bool:
        """Whether ``key`` (any key of a :class:`OneOf`) is there; :data:`DENSE` asks for ``ctx.dense``."""
        if isinstance(key, OneOf):
            return any(self.has(k) for k in key.keys)
        key = canonical_key(key)
        if key == DENSE:
            return self.dense is not None
        return key in self.analyses

    @overload
    def find(self, key: type[T], default: None = None) -> T | None: ...
    @overload
    def find(self, key: Key, default: Any = None) -> Any: ...

    def find(self, key: Key, default: Any = None) -> Any:
        """The analysis stored under ``key``, or ``default``."""
        key = canonical_key(key)
        if key == DENSE:
            return self.dense if self.dense is not None else default
        return self.analyses.get(key, default)

    @overload
    def get(self, key: type[T]) -> T: ...
    @overload
    def get(self, key: str | OneOf) -> Any: ...

    def get(self, key: Key | OneOf) -> Any:
        """The analysis stored under ``key`` (the first present one of a :class:`OneOf`); the standard
        missing-prerequisite :class:`PipelineError` (:func:`missing_error`) when there is none."""
        keys = key.keys if isinstance(key, OneOf) else (key,)
        for k in keys:
            value = self.find(k, _MISSING)
            if value is not _MISSING:
                return value
        raise missing_error(key)

    def put(self, value: Any, key: Key | None = None) -> None:
        """Store ``value`` under ``key`` (default: its type); a typed key must match the value's type."""
        if key is None:
            key = type(value)
        key = canonical_key(key)
        if isinstance(key, type) and not isinstance(value, key):
            raise PipelineError(f"ctx.put: {key_name(key)!r} must be a {key.__name__}, got {type(value).__name__}")
        self._store(key, value)

    def _store(self, key: Key, value: Any) -> None:
        if key == DENSE:
            self.dense = value
            return
        self.analyses[key] = value
        self._basis[key] = self.analyses.get(Graph)

    def pop(self, key: Key, default: Any = None) -> Any:
        """Remove and return the analysis under ``key`` (``default`` when there is none)."""
        key = canonical_key(key)
        if key == DENSE:
            dense, self.dense = self.dense, None
            return dense if dense is not None else default
        self._basis.pop(key, None)
        return self.analyses.pop(key, default)

    def basis(self, key: Key) -> Graph | None:
        """The graph that was current when the analysis under ``key`` was stored."""
        return self._basis.get(canonical_key(key))

    def retire_graph(self, by: str) -> Graph | None:
        """Move ``ctx.graph`` to :attr:`retired` (the pass manager does this when a pass did not
        preserve the graph); returns it, or ``None`` when there was none."""
        graph = self.pop(Graph)
        if graph is not None:
            self.retired.append((by, graph))
        return graph

    def retired_graph(self, by: str) -> Graph | None:
        """The last graph that pass ``by`` made stale (``erase``: the graph it erased along)."""
        return next((g for name, g in reversed(self.retired) if name == by), None)

    @property
    def results(self) -> _ResultsView:
        """Deprecated string-keyed view of the context (``ctx.results["graph"]``), kept for old callers.

        Reads and writes go to the typed fields: ``"dense-model"`` is :attr:`dense`, ``"dump_dir"``
        and ``"verify"`` are :attr:`options`, ``"graph-before-erase"`` (``-merge``, ``-lora``) are
        :attr:`retired` graphs, a registered result name (``"graph"``, ``"knowledge-distribution"``,
        ...) is its type's key, any other name a string key. New code uses :meth:`get` / :meth:`put`.
        """
        return _ResultsView(self)

    # -- reporting -----------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        """Record a warning that ends up in the compile report."""
        self.warnings.append(message)

    @contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[ProgressBar]:
        """A progress bar for a long loop inside a pass; the CLI renders it with rich.

        Example:
            >>> ctx = Context(model=torch.nn.Linear(2, 2))
            >>> with ctx.progress(total=10, description="lhspg") as bar:
            ...     for step in range(10):
            ...         bar.advance()
        """
        from shear.progress import open_bar

        with open_bar(self.progress_sink, total, description) as bar:
            yield bar


class _ResultsView(MutableMapping[str, Any]):
    """``ctx.results``: the context under the old string names (see :attr:`Context.results`)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def _retired_by(self, name: str) -> tuple[str, ...] | None:
        if not name.startswith("graph-before-"):
            return None
        what = name[len("graph-before-") :]
        return _LEGACY_RETIRED.get(what, (what,))

    def __getitem__(self, name: str) -> Any:
        ctx = self._ctx
        if name == "dump_dir" and ctx.options.dump_dir is not None:
            return str(ctx.options.dump_dir)
        if name == "verify" and ctx.options.verify is False:
            return False
        passes = self._retired_by(name)
        if passes is not None:
            graph = next((g for by, g in reversed(ctx.retired) if by in passes), None)
            if graph is not None:
                return graph
            raise KeyError(name)
        value = ctx.find(_key_of(name), _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value

    def __setitem__(self, name: str, value: Any) -> None:
        ctx = self._ctx
        if name == "dump_dir":
            ctx.options.dump_dir = Path(value) if value is not None else None
        elif name == "verify":
            ctx.options.verify = value is not False
        elif (passes := self._retired_by(name)) is not None:
            ctx.retired.append((passes[0], value))
        else:
            ctx._store(_key_of(name), value)

    def __delitem__(self, name: str) -> None:
        ctx = self._ctx
        if name not in self:
            raise KeyError(name)
        if name == "dump_dir":
            ctx.options.dump_dir = None
        elif name == "verify":
            ctx.options.verify = True
        elif (passes := self._retired_by(name)) is not None:
            i = max(i for i, (by, _) in enumerate(ctx.retired) if by in passes)
            del ctx.retired[i]
        else:
            ctx.pop(_key_of(name))

    def _names(self) -> list[str]:
        ctx = self._ctx
        names = [key_name(k) for k in ctx.analyses]
        if ctx.dense is not None:
            names.append(DENSE)
        if ctx.options.dump_dir is not None:
            names.append("dump_dir")
        if ctx.options.verify is False:
            names.append("verify")
        for legacy, passes in _LEGACY_RETIRED.items():
            if any(by in passes for by, _ in ctx.retired):
                names.append(f"graph-before-{legacy}")
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __repr__(self) -> str:
        return f"ctx.results({', '.join(self._names())})"


