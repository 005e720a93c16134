"""Progress reporting for long passes and kernels, decoupled from how it is rendered.

It sits below the passes so training and the kernels can report progress too. A pass asks its
context for a progress handle; the pass manager decides where it goes: nowhere
(the default, e.g. in tests and library use), or a rich progress bar (the ``shear`` CLI, or
``shear.compile(..., progress=True)``).

Example:
    >>> from shear.passes.base import Context
    >>> import torch
    >>> ctx = Context(model=torch.nn.Linear(2, 2))
    >>> with ctx.progress(total=3, description="calibrate") as bar:
    ...     for _ in range(3):
    ...         bar.advance()
    >>> bar.completed
    3
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["ProgressBar", "ProgressSink", "NullSink", "RichSink", "open_bar"]


class ProgressBar:
    """A handle a pass advances; it forwards to the sink that renders it (if any)."""

    def __init__(self, total: int | None, description: str, sink: ProgressSink | None = None) -> None:
        self.total = total
        self.description = description
        self.completed = 0
        self._sink = sink
        self._task: Any = None

    def advance(self, n: int = 1) -> None:
        """Mark ``n`` more units of work as done."""
        self.completed += n
        if self._sink is not None:
            self._sink.update(self)

    def set_description(self, description: str) -> None:
        """Change the text shown next to the bar (e.g. the current loss)."""
        self.description = description
        if self._sink is not None:
            self._sink.update(self)


class ProgressSink(Protocol):
    """Renders progress bars: ``start`` when a pass opens one, ``update`` on advance, ``stop`` at exit."""

    def start(self, bar: ProgressBar) -> None: ...

    def update(self, bar: ProgressBar) -> None: ...

    def stop(self, bar: ProgressBar) -> None: ...


class NullSink:
    """Renders nothing; bars still count, so passes can read ``bar.completed``."""

    def start(self, bar: ProgressBar) -> None:
        return None

    def update(self, bar: ProgressBar) -> None:
        return None

    def stop(self, bar: ProgressBar) -> None:
        return None


class RichSink:
    """Renders bars with :mod:`rich` on stderr (a live display started on the first bar)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._open = 0

    def start(self, bar: ProgressBar) -> None:
        if self._open == 0:
            self._progress.start()
        self._open += 1
        bar._task = self._progress.add_task(bar.description, total=bar.total)

    def update(self, bar: ProgressBar) -> None:
        if bar._task is not None:
            self._progress.update(bar._task, completed=bar.completed, description=bar.description)

    def stop(self, bar: ProgressBar) -> None:
        if bar._task is None:
            return
        self._progress.update(bar._task, completed=bar.completed)
        self._open -= 1
        if self._open == 0:
            self._progress.stop()


@contextmanager
def open_bar(sink: ProgressSink | None, total: int | None, description: str) -> Iterator[ProgressBar]:
    """Open a bar on ``sink`` for the duration of a ``with`` block (used by ``Context.progress``)."""
    bar = ProgressBar(total, description, sink)
    if sink is not None:
        sink.start(bar)
    try:
        yield bar
    finally:
        if sink is not None:
            sink.stop(bar)
