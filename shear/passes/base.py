"""The pass protocol: a pass is a frozen dataclass with a kebab-case name and typed options.

A pass reads and writes a :class:`Context` (the model, its traced graph, data, device, and typed
analysis results keyed by name) and returns a :class:`PassResult` saying what changed. Passes
register by name so that a pipeline can be written as a string, ``"random{ratio=0.3,seed=0}"``.

``requires`` names results a pass needs in ``ctx.results`` (e.g. ``"graph"`` for pruning groups);
``ensures`` names the results it provides. The pass manager checks them.

Example:
    >>> from dataclasses import dataclass
    >>> @register_pass
    ... @dataclass(frozen=True)
    ... class CountParams(Pass):
    ...     name = "count-params-example"
    ...     def run(self, ctx: Context) -> PassResult:
    ...         n = sum(p.numel() for p in ctx.model.parameters())
    ...         ctx.results["param-count"] = n
    ...         return PassResult(changed=False, message=f"{n} parameters")
    >>> "count-params-example" in PASS_REGISTRY
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

from shear.errors import PipelineError

if TYPE_CHECKING:
    from shear.runtime.progress import ProgressBar, ProgressSink

__all__ = ["Pass", "PassResult", "Context", "PASS_REGISTRY", "register_pass"]

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class PassResult:
    """What a pass did: whether it changed weights/masks/IR, a one-line message, and statistics."""

    changed: bool
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything passes share: the model being transformed, its IR, inputs, data and results.

    ``results`` holds typed analysis results by name (``"graph"`` holds the traced
    :class:`shear.graph.Graph` once discovery ran; ``"saliency"`` the scores, ...).
    """

    model: nn.Module
    example_inputs: Any = None
    """Positional tuple, keyword dict, or a single tensor: what the model is called with."""
    data: Any = None
    device: torch.device | None = None
    results: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    progress_sink: ProgressSink | None = None
    """Where progress bars go (set by the pass manager / CLI); ``None`` renders nothing."""

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
        from shear.runtime.progress import open_bar

        with open_bar(self.progress_sink, total, description) as bar:
            yield bar


class Pass:
    """Base of every pass. Subclasses are frozen dataclasses with options as typed fields."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    """Result names that must be in ``ctx.results`` before the pass runs."""
    ensures: ClassVar[tuple[str, ...]] = ()
    """Result names the pass puts into ``ctx.results``."""
    reads_weights: ClassVar[bool] = True
    """False for passes that only read the graph (they run on a meta-device skeleton too)."""

    def run(self, ctx: Context) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, ctx: Context) -> PassResult:
        return self.run(ctx)


PASS_REGISTRY: dict[str, type[Pass]] = {}
"""Registered pass classes by kebab-case name."""

P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: register a pass under its ``name`` (kebab-case, unique)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _KEBAB.match(name):
        raise PipelineError(f"pass {cls.__qualname__} needs a kebab-case `name`, got {name!r}")
    existing = PASS_REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise PipelineError(f"pass name {name!r} is already registered by {existing.__qualname__}")
    PASS_REGISTRY[name] = cls
    return cls
