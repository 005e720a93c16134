"""Small inline-SVG charts for the HTML report: heatmap, bars, lines, stacked bars.

Each function returns one ``<svg>`` element as text (a ``viewBox`` and ``width="100%"``, so it
scales with the page) with a ``<title>`` on every mark for hover tooltips. No script and no
external file: the report stays one small self-contained file that opens offline.

Example:
    >>> svg = bars(["a", "b"], [1.0, 3.0], title="demo")
    >>> svg.startswith("<svg") and svg.count("<rect") >= 2
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["heatmap", "bars", "lines", "stacked", "PALETTE"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
_FONT = 'font-family="Helvetica,Arial,sans-serif"'


def _shade(kept: float) -> str:
    """Heatmap colour: 1.0 (all kept) pale #f4f8fb, 0.0 (all pruned) deep red #c0392b."""
    k = max(0.0, min(1.0, float(kept)))
    r, g, b = (round(a + (z - a) * (1 - k)) for a, z in zip((244, 248, 251), (192, 57, 43)))
    return f"#{r:02x}{g:02x}{b:02x}"


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-2):
        return f"{x:.3g}"
    return f"{x:.3f}".rstrip("0").rstrip(".") if abs(x) < 100 else f"{x:.1f}"


def _open(width: float, height: float, title: str, cls: str) -> list[str]:
    out = [
        f'<svg class="chart {cls}" viewBox="0 0 {width:.0f} {height:.0f}" width="100%" '
        f'style="max-width:{width:.0f}px" xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}">'
    ]
    if title:
        out.append(
            f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" font-size="13" {_FONT}>{escape(title)}</text>'
        )
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    texts: Sequence[Sequence[str]] | None = None,
    *,
    title: str = "",
    cell: int = 26,
    label_width: int = 130,
) -> str:
    """Cells coloured by ``values`` in [0, 1] (1: all kept, pale; lower: more pruned, deeper red).

    ``None`` is a grey cell (no such group in that column). ``texts`` are the cells' tooltips.
    """
    w = label_width + cell * len(cols) + 80
    h = 30 + 18 + cell * len(rows) + 12
    out = _open(w, h, title, "heatmap")
    for j, c in enumerate(cols):
        x = label_width + j * cell + cell / 2
        out.append(f'<text x="{x:.0f}" y="42" text-anchor="middle" font-size="9" {_FONT}>{escape(c)}</text>')
    for i, r in enumerate(rows):
        y = 48 + i * cell
        out.append(
            f'<text x="{label_width - 6}" y="{y + cell / 2 + 4:.0f}" text-anchor="end" font-size="11" {_FONT}>{escape(r)}</text>'
        )
        for j in range(len(cols)):
            v = values[i][j]
            tip = texts[i][j] if texts else ("" if v is None else f"{v:.0%} kept")
            if v is None:
                fill = "#e8e8e8"
            else:
                fill = _shade(v)
            out.append(
                f'<rect class="cell" x="{label_width + j * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{fill}" stroke="#ccc" stroke-width="0.5"><title>{escape(r)}, {escape(cols[j])}: {escape(tip)}</title></rect>'
            )
    lx = label_width + cell * len(cols) + 10
    for i, (k, lab) in enumerate(((1.0, "kept"), (0.5, "50%"), (0.0, "pruned"))):
        out.append(
            f'<rect x="{lx}" y="{48 + i * 16}" width="12" height="12" fill="{_shade(k)}" stroke="#ccc"/>'
        )
        out.append(f'<text x="{lx + 16}" y="{58 + i * 16}" font-size="10" {_FONT}>{lab}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    highlight: Sequence[bool] | None = None,
    title: str = "",
    ylabel: str = "",
    bar: int = 16,
    colour: str = PALETTE[0],
    highlight_colour: str = PALETTE[2],
    symlog: bool = False,
) -> str:
    """Vertical bars with rotated labels; ``highlight`` bars drawn in ``highlight_colour``.

    ``symlog`` scales the axis by ``sign(v) log10(1 + |v|)``, so a few huge values (a node group
    whose removal breaks the model) do not flatten the rest.
    """
    n = max(len(values), 1)
    left, bottom, top, plot_h = 60, 150, 28, 220
    w = max(left + n * bar + 20, 8 * len(title) + 40)
    h = top + plot_h + bottom

    def t(v: float) -> float:
        return math.copysign(math.log10(1 + abs(v)), v) if symlog else v

    finite = [v for v in values if math.isfinite(v)]
    lo, hi = min(finite + [0.0]), max(finite + [0.0])
    hi = hi if hi > lo else lo + 1.0
    tlo, thi = t(lo), t(hi)

    def y(v: float) -> float:
        return top + plot_h * (thi - t(v)) / (thi - tlo)

    out = _open(w, h, title, "bars")
    if symlog:
        decades = [10.0**k for k in range(0, 7)]  # below 1, log10(1 + v) is ~0: labels would overlap 0
        ticks = [0.0] + [s * d for d in decades for s in (1, -1) if lo <= s * d <= hi]
    else:
        ticks = _ticks(lo, hi)
    for tv in ticks:
        out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(tv):.1f}" y2="{y(tv):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 4}" y="{y(tv) + 3:.1f}" text-anchor="end" font-size="9" {_FONT}>{_fmt(tv)}</text>'
        )
    if ylabel:
        out.append(
            f'<text transform="translate(12,{top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" font-size="10" {_FONT}>{escape(ylabel)}</text>'
        )
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = left + i * bar
        vv = v if math.isfinite(v) else hi
        y0, y1 = sorted((y(0.0), y(vv)))
        c = highlight_colour if highlight and highlight[i] else colour
        out.append(
            f'<rect class="bar" x="{x + 1}" y="{y0:.1f}" width="{bar - 2}" height="{max(y1 - y0, 0.5):.1f}" fill="{c}">'
            f"<title>{escape(lab)}: {_fmt(v)}</title></rect>"
        )
        ty = top + plot_h + 6
        out.append(
            f'<text transform="translate({x + bar / 2 + 3:.0f},{ty}) rotate(-60)" text-anchor="end" font-size="9" {_FONT}>{escape(lab)}</text>'
        )
    out.append(f'<line x1="{left}" x2="{w - 10}" y1="{y(0.0):.1f}" y2="{y(0.0):.1f}" stroke="#999"/>')
    out.append("</svg>")
    return "\n".join(out)


def lines(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    vlines: Sequence[tuple[float, str]] = (),
    width: int = 640,
    height: int = 260,
    markers: bool = False,
) -> str:
    """Line series over a shared x axis; ``vlines`` are labelled vertical rules (period boundaries)."""
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    left, right, top, bottom = 56, 130, 28, 40
    out = _open(width, height, title, "lines")
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" {_FONT}>no data</text></svg>'
        )
        return "\n".join(out)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def X(v: float) -> float:
        return left + pw * (v - x0) / (x1 - x0)

    def Y(v: float) -> float:
        return top + ph * (y1 - v) / (y1 - y0)

    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 4}" y="{Y(t) + 3:.1f}" text-anchor="end" font-size="9" {_FONT}>{_fmt(t)}</text>'
        )
    integer_x = all(float(p[0]).is_integer() for p in pts)
    for t in _ticks(x0, x1, 8):
        if integer_x and not float(t).is_integer():
            continue
        out.append(
            f'<text x="{X(t):.1f}" y="{top + ph + 14}" text-anchor="middle" font-size="9" {_FONT}>{_fmt(t)}</text>'
        )
    for xv, lab in vlines:
        out.append(
            f'<line x1="{X(xv):.1f}" x2="{X(xv):.1f}" y1="{top}" y2="{top + ph}" stroke="#bbb" stroke-dasharray="3,3"/>'
        )
        out.append(
            f'<text x="{X(xv) + 2:.1f}" y="{top + 9}" font-size="8" fill="#777" {_FONT}>{escape(lab)}</text>'
        )
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for k, (name, s) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        good = [(a, b) for a, b in s if math.isfinite(b)]
        if not good:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{X(a):.1f},{Y(b):.1f}" for i, (a, b) in enumerate(good))
        out.append(
            f'<path class="series" d="{d}" fill="none" stroke="{c}" stroke-width="1.6"><title>{escape(name)}</title></path>'
        )
        if markers or len(good) == 1:
            for a, b in good:
                out.append(
                    f'<circle cx="{X(a):.1f}" cy="{Y(b):.1f}" r="3" fill="{c}"><title>{escape(name)} @ {_fmt(a)}: {_fmt(b)}</title></circle>'
                )
        ly = top + 10 + 14 * k
        out.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{left + pw + 24}" y="{ly + 1}" font-size="10" {_FONT}>{escape(name)}</text>')
    if xlabel:
        out.append(
            f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" font-size="10" {_FONT}>{escape(xlabel)}</text>'
        )
    if ylabel:
        out.append(
            f'<text transform="translate(12,{top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" font-size="10" {_FONT}>{escape(ylabel)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)


def stacked(
    labels: Sequence[str], series: dict[str, Sequence[float]], *, title: str = "", width: int = 520
) -> str:
    """Horizontal 100% stacked bars, one per label (e.g. a recovery round's source mixture)."""
    left, bar, top = 90, 22, 28
    height = top + bar * len(labels) + 24 + 14 * ((len(series) + 3) // 4)
    pw = width - left - 20
    out = _open(width, height, title, "stacked")
    names = list(series)
    for i, lab in enumerate(labels):
        y = top + i * bar
        out.append(
            f'<text x="{left - 6}" y="{y + bar / 2 + 3:.0f}" text-anchor="end" font-size="10" {_FONT}>{escape(lab)}</text>'
        )
        total = sum(max(series[n][i], 0.0) for n in names) or 1.0
        x = float(left)
        for k, n in enumerate(names):
            share = max(series[n][i], 0.0) / total
            out.append(
                f'<rect x="{x:.1f}" y="{y + 2}" width="{pw * share:.1f}" height="{bar - 4}" fill="{PALETTE[k % len(PALETTE)]}">'
                f"<title>{escape(lab)}: {escape(n)} {share:.1%}</title></rect>"
            )
            x += pw * share
    ly = top + bar * len(labels) + 12
    for k, n in enumerate(names):
        x = left + (k % 4) * (pw / 4)
        y = ly + 14 * (k // 4)
        out.append(
            f'<rect x="{x:.0f}" y="{y - 8}" width="10" height="10" fill="{PALETTE[k % len(PALETTE)]}"/>'
        )
        out.append(f'<text x="{x + 14:.0f}" y="{y + 1}" font-size="10" {_FONT}>{escape(n)}</text>')
    out.append("</svg>")
    return "\n".join(out)
