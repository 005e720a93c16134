"""Progress bars of passes: moved to :mod:`shear.runtime.progress` (below the passes, so training and
the kernels can report progress); this name stays for code that imports it from here."""

from __future__ import annotations

from shear.runtime.progress import NullSink, ProgressBar, ProgressSink, RichSink, open_bar

__all__ = ["ProgressBar", "ProgressSink", "NullSink", "RichSink", "open_bar"]
