"""The speed section of ``report.html``: dense vs pruned tokens/s, speed-up and efficiency, the device,
and the slow widths with their fix.

It renders :meth:`shear.evaluation.speed.SpeedComparison.to_dict` (``ReportData.speed``). Efficiency
is coloured: at least :data:`GOOD_EFFICIENCY` green, below it amber, a slow-down (speed-up below 1) red.

Example:
    >>> from shear.report.html import _table
    >>> html = speed_body({"device": "cpu", "rows": [{"name": "prefill b1", "dense": 100.0, "pruned": 120.0,
    ...                    "speedup": 1.2, "efficiency": 0.96, "note": ""}], "ideal": 1.25}, _table)
    >>> "prefill b1" in html and "0.96" in html
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from typing import Any

__all__ = ["GOOD_EFFICIENCY", "speed_body"]

GOOD_EFFICIENCY = 0.9
"""Efficiency (speed-up / ideal speed-up) the page shows as good."""


def _num(x: Any, spec: str, suffix: str = "") -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    return format(x, spec) + suffix


def _efficiency(row: dict[str, Any]) -> str:
    eff, speedup = row.get("efficiency"), row.get("speedup")
    if not isinstance(eff, (int, float)):
        return "-"
    cls = "bad" if isinstance(speedup, (int, float)) and speedup < 1 else "ok" if eff >= GOOD_EFFICIENCY else "warn"
    return f'<span class="{cls}">{eff:.2f}</span>'


def speed_body(speed: dict[str, Any], table: Callable[..., str]) -> str:
    """The section's HTML for ``speed`` (a ``SpeedComparison.to_dict()``); ``table(head, rows, num)``
    is the page's table helper."""
    head = f"<p>measured on <b>{escape(str(speed.get('device', '?')))}</b>"
    if speed.get("load_average") is not None:
        head += f" (load average {speed['load_average']:.2f} when it started)"
    s = speed.get("settings") or {}
    if s:
        head += (f"; {escape(str(s.get('prompt_tokens')))}-token prompts, {escape(str(s.get('new_tokens')))} new "
                 f"tokens, {escape(str(s.get('dtype', '')))}, median of {escape(str(s.get('repeats')))} after a warm-up")  # fmt: skip
    head += ".</p>"
    rows = [
        [escape(r["name"]), _num(r.get("dense"), ",.1f"), _num(r.get("pruned"), ",.1f"),
         _num(r.get("speedup"), ".2f", "x"), _efficiency(r), escape(r.get("note") or "")]
        for r in speed.get("rows", [])
    ]  # fmt: skip
    body = head + table(["measurement", "dense tok/s", "pruned tok/s", "speed-up", "efficiency", "note"], rows, {1, 2, 3, 4})
    ideal = speed.get("ideal")
    if isinstance(ideal, (int, float)):
        body += (f"<p>ideal speed-up {ideal:.2f}x ({speed.get('dense_params', 0):,} → {speed.get('pruned_params', 0):,} "
                 "parameters); efficiency = speed-up / ideal speed-up, 1.00 is what the parameter count promises.</p>")  # fmt: skip
    widths = speed.get("slow_widths") or []
    if widths:
        body += (f'<p class="warn">widths that are not multiples of {escape(str(speed.get("granularity")))} '
                 f"(slow on this device's kernels); fix: {escape(str(speed.get('fix', 'prune with --target <device>')))}:</p>"
                 "<ul>" + "".join(f"<li><code>{escape(w)}</code></li>" for w in widths) + "</ul>")  # fmt: skip
    elif speed.get("granularity"):
        body += f"<p class=\"ok\">every pruned Linear width is a multiple of {escape(str(speed['granularity']))}.</p>"
    return body
