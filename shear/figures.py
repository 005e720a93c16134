"""Figures of analysis results, drawn with matplotlib's Agg backend (no display needed): all of
shear's plotting is here, below the passes that write figures and the report that shows them.

:func:`plot_deviation` draws LoRAShear's Figure 4: the perplexity deviation caused by pruning each
node group, in network order, with the node groups marked unprunable highlighted.
:func:`plot_recovery` draws a dynamic-recovery run: the source mixture per round as stacked bars, and
per-source perplexity after every round as lines.

Example:
    >>> paths = plot_deviation(["embed", "layers.0.mlp"], [0.5, 12.0], [False, True], "/tmp/kd")  # doctest: +SKIP
    >>> [p.suffix for p in paths]                                                              # doctest: +SKIP
    ['.png', '.svg']
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shear.errors import DataError, ShearError

__all__ = ["plot_deviation", "plot_recovery", "save_figure"]


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


def plot_recovery(
    rounds: Sequence[tuple[str, Mapping[str, float], Mapping[str, float]]],
    dense: Mapping[str, float],
    stem: str | os.PathLike[str],
    *,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Draw a recovery run: the source mixture of every round, and per-source ppl after every round.

    ``rounds`` holds ``(label, weights, ppl)`` per evaluation point, the first one being the state
    before recovery (its ``weights`` empty); a round with empty ``weights`` (an instruction round)
    gets a grey bar. Dense perplexities are drawn as dashed lines in each source's colour. Writes
    ``<stem>.<fmt>`` per format and returns the paths.
    """
    if not rounds:
        raise DataError("plot_recovery needs at least the evaluation before recovery")
    plt = _pyplot()
    sources = list(rounds[0][2])
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sources)}
    n = len(rounds)
    fig, (ax_w, ax_p) = plt.subplots(1, 2, figsize=(max(9.0, 1.1 * n + 5.0), 4.2))
    try:
        x = list(range(1, n))
        bottom = [0.0] * (n - 1)
        for s in sources:
            h = [float(r[1].get(s, 0.0)) for r in rounds[1:]]
            ax_w.bar(x, h, bottom=bottom, color=colours[s], label=s, edgecolor="white", linewidth=0.5)
            bottom = [b + v for b, v in zip(bottom, h)]
        grey = [1.0 if not r[1] else 0.0 for r in rounds[1:]]
        if any(grey):
            ax_w.bar(x, grey, color="#bbbbbb", label="instructions", edgecolor="white", linewidth=0.5)
        ax_w.set_xticks(x)
        ax_w.set_xticklabels([r[0] for r in rounds[1:]], rotation=45, ha="right", fontsize=8)
        ax_w.set_ylim(0, 1)
        ax_w.set_ylabel("share of training samples")
        ax_w.set_title("Source mixture per round", fontsize=10)
        ax_w.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        xs = list(range(n))
        for s in sources:
            ys = [float(r[2].get(s, math.nan)) for r in rounds]
            ax_p.plot(xs, ys, marker="o", color=colours[s], label=s)
            if s in dense:
                ax_p.axhline(dense[s], color=colours[s], linestyle="--", linewidth=0.8)
        ax_p.set_xticks(xs)
        ax_p.set_xticklabels([r[0] for r in rounds], rotation=45, ha="right", fontsize=8)
        ax_p.set_yscale("log")
        ax_p.set_ylabel("validation perplexity (dashed: dense)")
        ax_p.set_title("Per-source perplexity after each round", fontsize=10)
        ax_p.legend(fontsize=7, loc="best")
        return save_figure(fig, stem, formats)
    finally:
        plt.close(fig)
