"""The pass manager: runs a pipeline over a context, with prerequisites, checks, timing and dumps.

For every pass, in order, the manager

1. runs any missing prerequisite first: when a pass ``requires`` a key the context lacks, the
   provider the pass asks for (:meth:`Pass.provider`), else a registered pass that ``ensures`` it,
   may be auto-inserted and builds with default options, runs first (shear's own passes preferred,
   then by name; recorded with ``auto=True``), and the requirements are checked again (a provider
   may make the graph stale); otherwise a :class:`PipelineError` says what is missing and which
   pass would provide it. The whole pipeline is checked before anything runs, so a typo does not
   surface after an hour of training;
2. times the pass and records a :class:`PassRecord`;
3. checks that the pass stored what it ``ensures``; when its :class:`PassResult` says it did not
   preserve the graph, retires ``ctx.graph`` (to ``ctx.retired``), so that discovery runs again
   before the next pass that requires the graph; when checks are on, checks the IR invariants
   (``ctx.graph.check()``);
4. writes the printed IR (and an SVG when graphviz ``dot`` is installed) to ``dump_dir``, never over
   a file shear did not write there (:func:`shear.io.outputs.write_owned`);
5. calls the hooks (``shear.compile`` uses them for the report and the equivalence check).

A failing pass becomes a :class:`PassError` naming it and the passes before it, with the original
exception chained (``raise ... from e``), as in ``torch.fx.passes.infra.pass_manager``.

Checks run when ``check=True``; by default (``check=None``) they run when the environment sets
``SHEAR_DEBUG=1`` or under pytest (``PYTEST_CURRENT_TEST``), and ``SHEAR_DEBUG=0`` turns them off.

Example:
    >>> import torch
    >>> from shear.passes.base import Context
    >>> pm = PassManager(["discover-groups"])                           # doctest: +SKIP
    >>> ctx = Context(model=model, example_inputs=inputs)               # doctest: +SKIP
    >>> records = pm.run(ctx)                                           # doctest: +SKIP
    >>> print(records[0].name, f"{records[0].seconds:.2f}s")            # doctest: +SKIP
    discover-groups 0.41s
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shear.codegen.hf_config import max_positions
from shear.errors import OutputError, PassError, PipelineError
from shear.graph.ir import Graph
from shear.io.outputs import owned_file, write_owned
from shear.passes.base import (
    DENSE,
    Context,
    Key,
    OneOf,
    Pass,
    PassResult,
    canonical_key,
    ensures_key,
    key_name,
    missing_error,
)
from shear.passes.options import build_pass, format_pass
from shear.passes.pipeline import PipelineSpec, format_pipeline, resolve_pipeline
from shear.passes.registry import registered_passes

__all__ = ["PassManager", "PassRecord", "PassHook", "checks_enabled"]

_MAX_ROUNDS = 8
"""Bound on provide-and-recheck rounds for one pass (a provider may invalidate another prerequisite:
``lora`` makes the graph stale, so discovery runs again)."""


@dataclass
class PassRecord:
    """What one pass run did: its spelling, wall time, result, and whether the manager added it."""

    name: str
    spec: str
    """The pass as a pipeline string, options included (``random{ratio=0.3}``)."""
    seconds: float
    changed: bool
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    auto: bool = False
    """True when the manager ran it to provide a missing prerequisite."""


class PassHook(Protocol):
    """Observes a run: called before and after every pass (auto-inserted ones included)."""

    def before_pass(self, p: Pass, ctx: Context) -> None: ...

    def after_pass(self, p: Pass, record: PassRecord, ctx: Context) -> None: ...


def checks_enabled(check: bool | None = None) -> bool:
    """Whether IR invariants are checked after each pass: explicit flag, else ``SHEAR_DEBUG``, else pytest."""
    if check is not None:
        return check
    env = os.environ.get("SHEAR_DEBUG", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return "PYTEST_CURRENT_TEST" in os.environ


def _graph_check(graph: Any) -> None:
    for method in ("check", "lint"):
        fn = getattr(graph, method, None)
        if callable(fn):
            fn()
            return


class PassManager:
    """Runs a pipeline of passes over a :class:`Context`.

    Args:
        passes: anything :func:`~shear.passes.pipeline.resolve_pipeline` accepts (objects, a
            string, a TOML/YAML path, a list of these; ``None`` is the default pipeline).
        check: check IR invariants after every pass (default: under pytest or ``SHEAR_DEBUG=1``).
        dump_dir: write the printed IR after every pass to ``NN-<pass>.txt`` (and ``.svg``).
        overwrite: replace files of those names in ``dump_dir`` that shear did not write.
        auto_prerequisites: run a missing prerequisite's provider automatically, or raise.
        hooks: observers called around every pass.
    """

    def __init__(
        self,
        passes: PipelineSpec = None,
        *,
        check: bool | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        auto_prerequisites: bool = True,
        hooks: Sequence[PassHook] = (),
    ) -> None:
        self.passes: list[Pass] = resolve_pipeline(passes)
        self.check = check
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.overwrite = overwrite
        self.auto_prerequisites = auto_prerequisites
        self.hooks = list(hooks)
        self.records: list[PassRecord] = []

    def __repr__(self) -> str:
        return f"PassManager({format_pipeline(self.passes)!r})"

    @property
    def pipeline(self) -> str:
        """The pipeline as a string that parses back into equal passes."""
        return format_pipeline(self.passes)

    # -- prerequisites -------------------------------------------------------------------------

    def _provider(self, result: Key | OneOf, needed_by: Pass, chain: Sequence[str]) -> Pass:
        key = canonical_key(result.keys[0] if isinstance(result, OneOf) else result)
        asked = needed_by.provider(key)
        if asked is not None and self.auto_prerequisites:
            return asked
        providers = [cls for cls in registered_passes().values() if ensures_key(cls, key)]
        if not providers or not self.auto_prerequisites:
            raise missing_error(result, needed_by.name)
        names = ", ".join(repr(c.name) for c in providers)
        errors = []
        for cls in sorted(providers, key=lambda c: (not c.__module__.startswith("shear."), c.name)):
            if cls.name in chain or not cls.auto_insert:
                continue
            try:
                return build_pass(cls, {})
            except PipelineError as e:
                errors.append(str(e))
        if not errors:
            raise missing_error(result, needed_by.name)
        raise PipelineError(
            f"pass {needed_by.name!r} requires result {key_name(result)!r}; the passes that ensure it ({names}) "
            f"cannot run with default options, add one explicitly. {' '.join(errors)}"
        )

    def plan(self, available: Iterable[Key] = ()) -> list[tuple[Pass, bool]]:
        """The passes that will run, ``(pass, auto)``.

        Results accumulate, except the graph after a pass that ``restructures`` the model (discovery
        then runs again where a later pass requires the graph). Raises :class:`PipelineError` for a
        prerequisite nothing provides, for one that a later pass of the pipeline provides (wrong
        order), or when auto-insertion is off.
        """
        have = {canonical_key(k) for k in available}
        out: list[tuple[Pass, bool]] = []

        def present(r: Key | OneOf) -> bool:
            r = canonical_key(r)
            return any(k in have for k in r.keys) if isinstance(r, OneOf) else r in have

        def add(p: Pass, auto: bool, chain: tuple[str, ...], index: int) -> None:
            for _ in range(_MAX_ROUNDS):
                missing = [r for r in p.requires if not present(r)]
                if not missing:
                    break
                r = missing[0]
                keys = r.keys if isinstance(r, OneOf) else (r,)
                later = [q.name for q in self.passes[index + 1 :] if any(ensures_key(q, k) for k in keys)]
                if later and not auto:
                    raise PipelineError(
                        f"pass {p.name!r} requires result {key_name(r)!r}, which {later[0]!r} ensures, but "
                        f"{later[0]!r} runs after it: move {later[0]!r} before {p.name!r}"
                    )
                provider = self._provider(r, p, chain + (p.name,))
                add(provider, True, chain + (p.name,), index)
            else:
                raise PipelineError(f"pass {p.name!r}: its prerequisites keep invalidating each other")
            out.append((p, auto))
            have.update(canonical_key(k) for k in p.ensures)
            if p.restructures:
                have.discard(Graph)

        for i, p in enumerate(self.passes):
            add(p, False, (), i)
        return out

    # -- running -------------------------------------------------------------------------------

    def run(self, ctx: Context) -> list[PassRecord]:
        """Run the pipeline on ``ctx``; returns (and keeps in ``self.records``) one record per pass."""
        self.records = []
        planned = self.plan(set(ctx.analyses) | ({DENSE} if ctx.dense is not None else set()))
        if self.dump_dir is not None:  # never over a file shear did not write (shear.io.outputs)
            write_owned(self.dump_dir, "pipeline.txt", format_pipeline([p for p, _ in planned]) + "\n", overwrite=self.overwrite)
        with ctx.progress(total=len(self.passes), description="passes") as bar:
            for p in self.passes:
                bar.set_description(f"pass {p.name}")
                self._run_with_prerequisites(p, ctx, auto=False, chain=())
                bar.advance()
        return self.records

    __call__ = run

    def _run_with_prerequisites(self, p: Pass, ctx: Context, auto: bool, chain: tuple[str, ...]) -> None:
        for _ in range(_MAX_ROUNDS):
            missing = [r for r in p.requires if not ctx.has(r)]
            if not missing:
                break
            provider = self._provider(missing[0], p, chain + (p.name,))
            self._run_with_prerequisites(provider, ctx, auto=True, chain=chain + (p.name,))
            if not ctx.has(missing[0]):
                raise self._error(
                    p, f"prerequisite {key_name(missing[0])!r} is still missing after running {provider.name!r}"
                )
        else:
            raise self._error(p, "its prerequisites keep invalidating each other")
        self._run_one(p, ctx, auto)

    def _error(self, p: Pass, what: str) -> PassError:
        before = [r.name for r in self.records]
        return PassError(f"pass {p.name!r} (after passes {before}) failed: {what}")

    def _run_one(self, p: Pass, ctx: Context, auto: bool) -> None:
        for hook in self.hooks:
            hook.before_pass(p, ctx)
        seq_len = getattr(p, "seq_len", None)
        limit = max_positions(ctx.model) if isinstance(seq_len, int) else None
        if limit is not None and seq_len > limit:
            raise self._error(
                p, f"seq_len={seq_len} is longer than the model's {limit} positions; set {p.name}{{seq_len={limit}}}"
            )
        start = time.perf_counter()
        try:
            result = p.run(ctx)
        except Exception as e:
            raise self._error(p, f"{type(e).__name__}: {e}") from e
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise self._error(p, f"run() returned {type(result).__name__}, expected PassResult")
        missing = [key_name(r) for r in p.ensures if not ctx.has(r)]
        if missing:
            ensures = tuple(key_name(r) for r in p.ensures)
            raise self._error(p, f"it declares ensures={ensures} but did not store {missing} in the context")
        if not result.preserves_graph:
            ctx.retire_graph(p.name)
        record = PassRecord(p.name, format_pass(p), seconds, result.changed, result.message, dict(result.stats), auto)
        self.records.append(record)
        if checks_enabled(self.check) and ctx.has(Graph):
            try:
                _graph_check(ctx.graph)
            except Exception as e:
                before = [r.name for r in self.records[:-1]]
                raise PassError(
                    f"IR invariants broken after pass {p.name!r} (after passes {before}): {type(e).__name__}: {e}"
                ) from e
        if self.dump_dir is not None:
            self._dump(len(self.records), p, ctx)
        for hook in self.hooks:
            hook.after_pass(p, record, ctx)

    def _dump(self, index: int, p: Pass, ctx: Context) -> None:
        assert self.dump_dir is not None
        stem = f"{index:02d}-{p.name}"
        graph = ctx.graph
        n_params = sum(t.numel() for t in ctx.model.parameters())
        header = f"# after pass {index}: {format_pass(p)}\n# parameters: {n_params}\n"
        body = str(graph) if graph is not None else "# (no graph in the context yet)"
        write_owned(self.dump_dir, f"{stem}.txt", header + body + "\n", overwrite=self.overwrite)
        if graph is None or shutil.which("dot") is None:
            return
        try:
            from shear.graph import draw

            with owned_file(self.dump_dir, f"{stem}.svg", overwrite=self.overwrite) as tmp:
                draw(graph, tmp)
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - a drawing failure must not fail the pipeline
            ctx.warn(f"dump: could not draw the graph after {p.name!r}: {type(e).__name__}: {e}")
