"""The verdict section of ``report.html``: "kept X% of dense quality", the good/warn/bad badge and its
thresholds, next to the parameter figures; perplexity per source, task accuracy and generations of
the dense and the pruned model side by side.

Example:
    >>> from shear.evaluation.verdict import QualityResult, Verdict
    >>> dense = QualityResult("m", 100, "text", "quick", {"a": {"ppl": 10.0, "tokens": 255}})
    >>> pruned = QualityResult("m", 80, "text", "quick", {"a": {"ppl": 10.5, "tokens": 255}})
    >>> body = verdict_body(Verdict.from_pair(dense, pruned).to_dict(), lambda head, rows, num=(): "")
    >>> 'class="badge good"' in body and "kept 95.2% of dense quality" in body
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from html import escape
from typing import Any

__all__ = ["verdict_body"]

Table = Callable[..., str]
"""``table(head, rows, num_columns)`` of the page (``shear.report.html``), so both read alike."""


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1%}"


def _acc(row: Mapping[str, Any] | None, key: str) -> str:
    value = (row or {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def verdict_body(v: Mapping[str, Any], table: Table) -> str:
    """The section's HTML for a ``Verdict.to_dict()``."""
    before, after = v["before"], v["after"]
    judgement = str(v["judgement"])
    kpis = [
        ("perplexity ratio (dense / pruned)", _pct(v["ppl_ratio"])),
        ("accuracy ratio (pruned / dense)", _pct(v.get("accuracy_ratio"))),
        ("parameters before", f"{before['params']:,}"),
        ("parameters after", f"{after['params']:,}"),
        ("parameters kept", _pct(after["params"] / before["params"] if before["params"] else None)),
        ("evaluation time", f"{before['seconds'] + after['seconds']:.1f} s"),
    ]
    parts = [
        f'<p class="verdict"><span class="badge {escape(judgement)}">{escape(judgement.upper())}</span> '
        f"<b>{escape(str(v['headline']))}</b></p>",
        f"<p>{escape(str(v['reason']))}</p>",
        f"<p><small>thresholds: {escape(str(v['thresholds']['text']))} of the dense model's quality, measured as "
        "the perplexity ratio dense/pruned (geometric mean over the sources); the accuracy ratio lowers the "
        "judgement only when the drop exceeds two standard errors (docs/evaluation.md).</small></p>",
        "".join(f'<div class="kpi">{escape(k)}<b>{val}</b></div>' for k, val in kpis),
        f"<p>held-out: {escape(str(v['held_out']))}; size {escape(str(v['size']))}</p>",
    ]
    ratios = v["ppl_ratios"]
    rows = [
        [escape(s), f"{r['tokens']:,}", f"{r['ppl']:.2f}", f"{after['perplexity'][s]['ppl']:.2f}", f"{ratios[s]:.3f}"]
        for s, r in before["perplexity"].items()
    ]
    ppl = table(["source", "tokens", "dense ppl", "pruned ppl", "ratio"], rows, {1, 2, 3, 4})
    acc = ""
    if before["tasks"]:
        rows = [
            [
                escape(t), str(r.get("n") or "-"), _acc(r, "accuracy"), _acc(after["tasks"].get(t), "accuracy"),
                _acc(r, "accuracy_norm"), _acc(after["tasks"].get(t), "accuracy_norm"), _acc(r, "chance"),
                escape(str(r.get("by", ""))),
            ]
            for t, r in before["tasks"].items()
        ]  # fmt: skip
        acc = table(
            ["task", "n", "dense acc", "pruned acc", "dense acc_norm", "pruned acc_norm", "chance", "by"],
            rows, {1, 2, 3, 4, 5, 6},
        ) + ("<p><small>acc: the option with the highest summed log-probability wins; acc_norm: that sum "
             "divided by the option's length.</small></p>")  # fmt: skip
    parts.append(f'<div style="display:flex;gap:28px;flex-wrap:wrap"><div>{ppl}</div><div>{acc}</div></div>')
    if before["generations"]:
        pruned = {g["prompt"]: g["text"] for g in after["generations"]}
        rows = [
            [
                f"<pre class='gen'>{escape(g['prompt'])}</pre>",
                f"<pre class='gen'>{escape(g['text'])}</pre>",
                f"<pre class='gen'>{escape(pruned.get(g['prompt'], '-'))}</pre>",
            ]
            for g in before["generations"]
        ]
        parts.append("<p>greedy generations:</p>" + table(["prompt", "dense", "pruned"], rows))
    if v.get("speed") is None:
        parts.append(f'<p class="notrun">speed: {escape(str(v.get("speed_note") or "not measured"))}</p>')
    notes = sorted(set(before.get("notes", [])) | set(after.get("notes", [])))
    parts += [f'<p class="notrun">{escape(n)}</p>' for n in notes]
    return "\n".join(parts)
