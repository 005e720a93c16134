"""Figures of analysis results, drawn with matplotlib's Agg backend (no display needed).

:func:`plot_deviation` draws LoRAShear's Figure 4: the perplexity deviation caused by pruning each
node group, in network order, with the node groups marked unprunable highlighted.

Example:
    >>> paths = plot_deviation(["embed", "layers.0.mlp"], [0.5, 12.0], [False, True], "/tmp/kd")  # doctest: +SKIP
    >>> [p.suffix for p in paths]                                                              # doctest: +SKIP
    ['.png', '.svg']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shear.errors import ShearError

__all__ = ["plot_deviation", "save_figure"]


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError as e:
        raise ShearError("plotting needs matplotlib: pip install 'matplotlib>=3.8'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, stem: str | os.PathLike[str], formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Lay out ``fig`` and write ``<stem>.<fmt>`` for every format (parents created); return the paths.

    Written with :func:`shear.io.outputs.write_owned`: a file of the same name that shear did not
    write there is never replaced (:class:`~shear.errors.OutputError`)."""
    import io

    from shear.io.outputs import write_owned

    fig.tight_layout()
    stem = Path(stem)
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=150)
        # never over a file shear did not write there (shear-files.json records what it wrote)
        paths.append(write_owned(stem.parent, f"{stem.name}.{fmt}", buf.getvalue()))
    return paths


def plot_deviation(
    labels: Sequence[str],
    deviations: Sequence[float],
    highlight: Sequence[bool],
    stem: str | os.PathLike[str],
    *,
    title: str = "Knowledge distribution: perplexity deviation per node group",
    ylabel: str = "perplexity deviation",
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Bar plot of ``deviations`` (one bar per label, in the given order); highlighted bars in red.

    Writes ``<stem>.<fmt>`` for every format and returns the paths. The y axis turns symmetric-log
    when the bars span more than three orders of magnitude (linear within a thousandth of the
    largest bar), so small deviations stay visible next to a collapse.
    """
    if not (len(labels) == len(deviations) == len(highlight)):
        raise ShearError(f"plot_deviation: {len(labels)} labels, {len(deviations)} values, {len(highlight)} flags")
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2.0), 4.2))
    try:
        colours = ["#d62728" if h else "#7f9fbf" for h in highlight]
        ax.bar(range(n), list(deviations), color=colours, edgecolor="none")
        ax.set_xticks(range(n))
        ax.set_xticklabels(list(labels), rotation=90, fontsize=6 if n > 30 else 8)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("node group (network order)")
        ax.set_title(title, fontsize=10)
        ax.axhline(0.0, color="black", linewidth=0.6)
        mags = [abs(d) for d in deviations if d != 0 and d == d]
        if mags and max(mags) / min(mags) > 1e3:
            ax.set_yscale("symlog", linthresh=max(mags) / 1e3)
            low = min([d for d in deviations if d == d] + [0.0])
            ax.set_ylim(bottom=1.5 * low, top=3.0 * max(max(deviations), 0.0) or None)
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color="#d62728", label="unprunable"), Patch(color="#7f9fbf", label="prunable")],
            fontsize=8,
            loc="best",
        )
        return save_figure(fig, stem, formats)
    finally:
        plt.close(fig)
