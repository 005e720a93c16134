"""``report.html``: one self-contained page of what a pruning run did, for a browser with no network.

Sections, in order: the quality verdict ("kept X% of dense quality", good/warn/bad, measured before
and after on held-out text), speed (dense vs pruned tokens/s, efficiency, slow widths), summary
(parameters before/after), passes with their times, verification,
kept widths per layer (a heatmap of heads, kv heads and MLP channels), the knowledge distribution,
LHSPG's schedule (structures zeroed per period, loss per step), the recovery rounds (per-source
perplexity, source mixture), perplexity and generations before/after, and the folded IR drawing
(:mod:`shear.graph.draw`) whose groups light up on hover. A stage that did not run says "not run".

Styles, the charts (inline SVG, :mod:`shear.report.charts`) and the few lines of script that
highlight a group are all inline: the file opens offline and can be mailed as it is.

Example:
    >>> from shear.report.collect import ReportData
    >>> page = render(ReportData(title="empty run"))
    >>> page.startswith("<!DOCTYPE html>") and page.count("not run") >= 5
    True
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from shear.graph.draw import KIND_COLOURS, group_class, to_svg
from shear.graph.fold import display_kind, fold
from shear.report import charts
from shear.report.collect import ReportData
from shear.report.speed_html import speed_body
from shear.report.verdict_html import verdict_body

__all__ = ["render", "write_html", "SECTIONS"]

SECTIONS: tuple[tuple[str, str], ...] = (
    ("verdict", "Quality verdict"),
    ("speed", "Speed: dense vs pruned"),
    ("summary", "Summary"),
    ("passes", "Passes"),
    ("verification", "Verification"),
    ("widths", "Kept widths per layer"),
    ("knowledge", "Knowledge distribution"),
    ("lhspg", "LHSPG schedule"),
    ("recovery", "Recovery"),
    ("quality", "Perplexity and generations"),
    ("ir", "Node groups (folded IR)"),
)
"""``(id, heading)`` of every section, in page order."""

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;font-size:13px;color:#cfd8dc}
nav{position:sticky;top:0;background:#eceff1;padding:6px 24px;font-size:13px;z-index:2;border-bottom:1px solid #cfd8dc}
nav a{margin-right:14px;color:#37474f;text-decoration:none} nav a:hover{text-decoration:underline}
main{padding:8px 24px 40px;max-width:1500px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;margin:16px 0;padding:10px 18px 16px}
h2{font-size:17px;margin:6px 0 10px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border-bottom:1px solid #eee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.notrun{color:#888;font-style:italic}
.kpi{display:inline-block;margin:4px 28px 4px 0} .kpi b{display:block;font-size:22px}
.tbar{display:inline-block;height:9px;background:#4e79a7;vertical-align:middle}
.warn{color:#8a5a00} .ok{color:#2e7d32} .bad{color:#c62828}
p.verdict b{font-size:22px;vertical-align:middle}
.badge{display:inline-block;padding:3px 12px;border-radius:12px;font-weight:bold;vertical-align:middle;margin-right:8px}
.badge.good,.badge.warn,.badge.bad{color:#fff} .badge.good{background:#2e7d32} .badge.warn{background:#e09100} .badge.bad{background:#c62828}
pre.gen{white-space:pre-wrap;background:#f7f7f7;padding:6px;margin:2px 0;font-size:12px;max-width:620px}
.legend li{display:inline-block;margin:2px 6px;padding:2px 8px;border-radius:10px;border:2px solid;font-size:12px;cursor:pointer}
.legend li.hl{background:#fff3c4}
#ir-drawing{overflow:auto;border:1px solid #eee;max-height:85vh}
#ir-drawing svg{max-width:100%;height:auto}
#ir-drawing.hovering g.node,#ir-drawing.hovering g.edge,#ir-drawing.hovering g.cluster{opacity:.25}
#ir-drawing.hovering g.hl{opacity:1}
#ir-drawing g.hl polygon,#ir-drawing g.hl ellipse,#ir-drawing g.hl path{stroke-width:3.5px}
"""

_JS = """
(function(){
  var box = document.getElementById('ir-drawing');
  if (!box) return;
  function groupOf(el){
    while (el && el !== box){
      var c = el.getAttribute && el.getAttribute('class');
      if (c){ var m = c.match(/\\bsg-[A-Za-z0-9_-]+/); if (m) return m[0]; }
      el = el.parentNode;
    }
    return null;
  }
  function light(g){
    var on = document.querySelectorAll('.hl');
    for (var i = 0; i < on.length; i++) on[i].classList.remove('hl');
    box.classList.toggle('hovering', !!g);
    if (!g) return;
    var els = document.querySelectorAll('.' + g);
    for (var j = 0; j < els.length; j++) els[j].classList.add('hl');
    var out = document.getElementById('ir-hover');
    var li = document.querySelector('.legend li[data-group="' + g + '"]');
    if (out) out.textContent = (li ? li.textContent : g) + ': ' + box.querySelectorAll('g.node.' + g).length + ' nodes highlighted';
  }
  box.addEventListener('mouseover', function(e){ light(groupOf(e.target)); });
  box.addEventListener('mouseleave', function(){ light(null); });
  var items = document.querySelectorAll('.legend li[data-group]');
  for (var k = 0; k < items.length; k++){
    items[k].addEventListener('mouseenter', function(e){ light(e.currentTarget.getAttribute('data-group')); });
    items[k].addEventListener('mouseleave', function(){ light(null); });
  }
})();
"""


def _not_run(what: str) -> str:
    return f'<p class="notrun">not run: {escape(what)}</p>'


def _num(x: Any, spec: str = ",") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _table(head: list[str], rows: list[list[str]], num: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>" for i, c in enumerate(r))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _section(sid: str, body: str) -> str:
    heading = dict(SECTIONS)[sid]
    return f'<section id="{sid}"><h2>{escape(heading)}</h2>\n{body}\n</section>'


def _summary(d: ReportData) -> str:
    ratio = d.params_after / d.params_before if d.params_before else 1.0
    seconds = sum(p["seconds"] for p in d.passes)
    kpis = [
        ("parameters before", f"{d.params_before:,}"),
        ("parameters after", f"{d.params_after:,}"),
        ("kept", f"{ratio:.1%}"),
        ("pipeline time", f"{seconds:.1f} s"),
    ]
    body = "".join(f'<div class="kpi">{escape(k)}<b>{v}</b></div>' for k, v in kpis)
    body += f"<p>pipeline: <code>{escape(d.pipeline) or 'none'}</code></p>"
    if d.target:
        body += f"<p>{escape(str(d.target.get('describe', '')))}</p>"
    if d.warnings:
        body += "<ul>" + "".join(f'<li class="warn">{escape(w)}</li>' for w in d.warnings) + "</ul>"
    body += "".join(f"<p>{escape(n)}</p>" for n in d.notes)
    return _section("summary", body)


def _passes(d: ReportData) -> str:
    if not d.passes:
        return _section("passes", _not_run("no pass ran"))
    top = max(p["seconds"] for p in d.passes) or 1.0
    rows = [
        [
            str(i),
            escape(p["spec"]) + (" <small>(auto)</small>" if p["auto"] else ""),
            f'{p["seconds"]:.2f} s <span class="tbar" style="width:{120 * p["seconds"] / top:.0f}px"></span>',
            "yes" if p["changed"] else "-",
            escape(p["message"]),
        ]
        for i, p in enumerate(d.passes, 1)
    ]
    return _section("passes", _table(["#", "pass", "time", "changed", "message"], rows, {0}))


def _verification(d: ReportData) -> str:
    if not d.verify:
        return _section("verification", _not_run("no pass changed parameter shapes, or verify=False"))
    rows = [
        [escape(v["what"]), f'<span class="ok">{v["max_diff"]:.3g}</span>', escape(v["note"])]
        for v in d.verify
    ]
    return _section("verification", _table(["check", "max |diff|", "what was compared"], rows, {1}))


def _widths(d: ReportData) -> str:
    if not d.widths:
        return _section("widths", _not_run("no prunable groups inside repeated layers"))
    values, texts = [], []
    for r in d.widths:
        values.append(
            [None if b is None or a is None else (a / b if b else 1.0) for b, a in zip(r.before, r.after)]
        )
        texts.append(
            ["-" if b is None or a is None else f"{a} of {b} kept" for b, a in zip(r.before, r.after)]
        )
    pruned = any(a != b for r in d.widths for a, b in zip(r.after, r.before))
    title = "share kept per layer" + ("" if pruned else " (nothing pruned)")
    body = charts.heatmap([r.label for r in d.widths], [str(i) for i in d.layers], values, texts, title=title)
    rows = []
    for r in d.widths:
        before = sum(b or 0 for b in r.before)
        after = sum(a or 0 for a in r.after)
        per = ", ".join("-" if a is None else str(a) for a in r.after)
        rows.append(
            [escape(r.label), f"{before:,}", f"{after:,}", f"{after / before:.1%}" if before else "-", per]
        )
    body += _table(["group", "before", "after", "kept", "per layer (after)"], rows, {1, 2, 3})
    if d.other_groups:
        rows = [
            [escape(g["name"]), escape(g["kind"]), f"{g['before']:,}", f"{g['after']:,}"]
            for g in d.other_groups
        ]
        body += "<p>Groups outside the layers:</p>" + _table(
            ["group", "kind", "before", "after"], rows, {2, 3}
        )
    return _section("widths", body)


def _knowledge(d: ReportData) -> str:
    k = d.knowledge
    if not k:
        return _section("knowledge", _not_run("knowledge-distribution"))
    entries = k["entries"]
    finite = [e["deviation"] for e in entries if e["deviation"] is not None]
    cap = max([abs(x) for x in finite] + [1.0]) * 1.2
    labels = [_short(e["name"]) + (" (lora)" if e["kind"] == "composed" else "") for e in entries]
    values = [e["deviation"] if e["deviation"] is not None else cap for e in entries]
    marked = sum(e["unprunable"] for e in entries)
    body = (
        f"<p>Perplexity deviation when pruning {k['ratio']:.0%} of each node group by {escape(str(k['proxy']))} "
        f"(base perplexity {k['base_ppl']:.3f}); the top {k['gamma']:.0%} ({marked} node groups, red) are kept "
        f"unprunable.</p>"
    )
    body += charts.bars(
        labels,
        values,
        highlight=[e["unprunable"] for e in entries],
        ylabel="Δ perplexity (symlog)",
        symlog=True,
    )
    protected = sorted(
        (e for e in entries if e["unprunable"]), key=lambda e: (e["deviation"] is not None, -(e["deviation"] or 0.0))
    )
    if protected:
        rows = [
            [escape(e["name"]), escape(e["kind"]), _num(e["structures"]), _num(e["ppl"], ".3f"), _num(e["deviation"], "+.3f")]
            for e in protected
        ]
        body += "<p>Protected node groups, most sensitive first (Δ perplexity when pruned; - : not finite):</p>"
        body += _table(["node group", "kind", "structures zeroed", "perplexity", "Δ perplexity"], rows, {2, 3, 4})
    return _section("knowledge", body)


def _option(spec: str, name: str) -> int | None:
    m = re.search(rf"\b{name}=(\d+)", spec)
    return int(m.group(1)) if m else None


def _lhspg(d: ReportData) -> str:
    r = d.lhspg
    if not r:
        return _section("lhspg", _not_run("lhspg"))
    warmup, tp = _option(r["spec"], "warmup"), _option(r["spec"], "steps_per_period")
    vlines = []
    if warmup is not None and tp:
        vlines.append((float(warmup), "warm-up end"))
        vlines += [
            (float(warmup + (p["period"] + 1) * tp), f"period {p['period'] + 1}") for p in r["periods"]
        ]
    body = (
        f"<p>{r['structures']:,} structures zeroed over {r['steps']} steps: {r['params_before']:,} → "
        f"{r['params_after']:,} parameters once erased (−{r['predicted_reduction']:.1%}, target "
        f"{r['target']:.0%}); {r['projected']} reached zero early by the half-space projection.</p>"
    )
    body += charts.lines(
        {"training loss": r["losses"]},
        title="LHSPG loss per step",
        xlabel="step",
        ylabel="loss",
        vlines=vlines,
    )
    if r["periods"]:
        body += charts.bars(
            [f"period {p['period'] + 1}" for p in r["periods"]],
            [float(p["moved"] or 0) for p in r["periods"]],
            title="structures moved to the redundant set per period",
            bar=60,
        )
        rows = [
            [str(p["period"] + 1), _num(p["moved"]), _num(p["zero"]), _num(p["loss"], ".4f")]
            for p in r["periods"]
        ]
        body += _table(
            ["period", "structures moved", "zero at period end", "loss at period end"], rows, {1, 2, 3}
        )
    return _section("lhspg", body)


def _recovery(d: ReportData) -> str:
    r = d.recovery
    if not r:
        return _section("recovery", _not_run("recover-dynamic"))
    rounds = r["rounds"]
    sources = list(rounds[0]["ppl"]) if rounds else []
    xs = list(range(len(rounds)))
    series: dict[str, Sequence[tuple[float, float]]] = {
        s: [(float(x), float(v["ppl"][s])) for x, v in zip(xs, rounds) if v["ppl"].get(s) is not None]
        for s in sources
    }
    for s in sources:
        dense = r["dense_ppl"].get(s)
        if dense is not None:
            series[f"{s} (dense)"] = [(0.0, dense), (float(max(xs[-1], 1)), dense)]
    body = charts.lines(
        series,
        title="perplexity per source after each round",
        xlabel="round",
        ylabel="perplexity",
        markers=True,
    )
    mixed = [v for v in rounds if v["weights"]]
    if mixed:
        names = sorted({s for v in mixed for s in v["weights"]})
        body += charts.stacked(
            [f"{v['stage']} {v['index']}" for v in mixed],
            {s: [v["weights"].get(s, 0.0) for v in mixed] for s in names},
            title="source mixture per round",
        )
    rows = [
        [
            f"{v['stage']} {v['index']}" + (" (undone)" if v["restored"] else ""),
            _num(v["steps"]),
            _num(v["tokens"]),
            _num(v["mean_ppl"], ".2f"),
            _num(v["instruction_loss"], ".4f"),
            _num(v["gain"], "+.2%"),
        ]
        for v in rounds
    ]
    body += _table(
        ["round", "steps", "tokens", "mean ppl", "instruction loss", "gain"], rows, {1, 2, 3, 4, 5}
    )
    if r["stopped"]:
        body += (
            "<p>stopped: " + ", ".join(f"{escape(k)}: {escape(v)}" for k, v in r["stopped"].items()) + "</p>"
        )
    return _section("recovery", body)


def _speed(d: ReportData) -> str:
    if not d.speed:
        return _section("speed", _not_run(
            "speed was not measured: shear prune measures it with the verdict; in Python, "
            "shear.evaluation.compare_speed(dense, pruned); on demand, shear bench DENSE PRUNED"
        ))  # fmt: skip
    return _section("speed", speed_body(d.speed, _table))


def _verdict(d: ReportData) -> str:
    if not d.verdict:
        return _section("verdict", _not_run(
            "quality was not measured: shear prune measures it unless --no-eval; in Python, "
            "shear.compile(..., data=TextData, evaluate=True)"
        ))  # fmt: skip
    return _section("verdict", verdict_body(d.verdict, _table))


def _quality(d: ReportData) -> str:
    parts = []
    if d.perplexity:
        before, after = d.perplexity.get("before") or {}, d.perplexity.get("after") or {}
        rows = []
        for s in list(before) + [s for s in after if s not in before]:
            b, a = _as_float(before.get(s)), _as_float(after.get(s))
            change = f"{a / b - 1:+.1%}" if a is not None and b else "-"
            rows.append([escape(s), _num(b, ".2f"), _num(a, ".2f"), change])
        parts.append(_table(["source", "perplexity before", "after", "change"], rows, {1, 2, 3}))
    else:
        parts.append(
            "<p>perplexity per source before/after: in the quality verdict above</p>"
            if d.verdict else _not_run("perplexity before/after (shear prune without --no-eval, or evaluate=True)")
        )
    if d.generations:
        rows = [
            [
                f"<pre class='gen'>{escape(g.get('prompt', ''))}</pre>",
                f"<pre class='gen'>{escape(g.get('before', ''))}</pre>",
                f"<pre class='gen'>{escape(g.get('after') or 'not run')}</pre>",
            ]
            for g in d.generations
        ]
        parts.append(_table(["prompt", "before", "after"], rows))
    else:
        parts.append(
            "<p>generations before/after: in the quality verdict above</p>"
            if d.verdict else _not_run("generations before/after (shear prune without --no-eval, or evaluate=True)")
        )
    return _section("quality", "\n".join(parts))


def _as_float(x: Any) -> float | None:
    if isinstance(x, dict):
        x = x.get("ppl", x.get("perplexity"))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _short(name: str) -> str:
    parts = name.replace("/", ".").split(".")
    keep = [p for p in parts if p not in ("base_model", "model", "layers")]
    return ".".join(keep[-3:]) if keep else name


def _ir(d: ReportData) -> str:
    g = d.graph
    if g is None:
        return _section("ir", _not_run("no pass traced the model (discover-groups)"))
    try:
        svg = to_svg(g)
    except Exception as e:  # noqa: BLE001 - the page still renders without the drawing, saying why
        return _section("ir", f'<p class="warn">no drawing: {escape(str(e))}</p>')
    svg = svg[svg.find("<svg") :]
    svg = re.sub(r"<!--.*?-->\n?", "", svg, flags=re.S)
    fg = fold(g)
    seen: dict[str, tuple[str, str]] = {}
    for p in g.prunable_groups:
        cls = group_class(fg.template(p.name))
        if cls not in seen:
            kind = display_kind(p)
            where = fg.local(p.name) if fg.block_of(p.name) is not None else _short(p.name)
            label = f"{where} ({kind})"
            seen[cls] = (label, KIND_COLOURS[kind])
    legend = "".join(
        f'<li data-group="{cls}" style="border-color:{colour}">{escape(label)}</li>'
        for cls, (label, colour) in seen.items()
    )
    body = (
        "<p>The IR the pipeline pruned (LoRA-wrapped where adapters were added), identical layers folded. "
        "Hover a group here or in the drawing to highlight its members.</p>"
        f'<ul class="legend">{legend}</ul><p id="ir-hover" class="notrun">&nbsp;</p>'
        f'<div id="ir-drawing">{svg}</div>'
    )
    return _section("ir", body)


def render(d: ReportData) -> str:
    """The whole page as one HTML string."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{sid}">{escape(h)}</a>' for sid, h in SECTIONS)
    body = "\n".join(
        f(d)
        for f in (_verdict, _speed, _summary, _passes, _verification, _widths, _knowledge, _lhspg, _recovery, _quality, _ir)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(d.title)}</title><style>{_CSS}</style></head><body>\n"
        f"<header><h1>{escape(d.title)}</h1><p>{escape(d.model)} · written {stamp} by shear</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n<script>{_JS}</script>\n</body></html>\n"
    )


def write_html(d: ReportData, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render` of ``d`` to ``path`` (its folder is created); returns the path.

    The page is rendered first, then written atomically through the output guard
    (:func:`shear.io.outputs.atomic_file`): a path is replaced only while it is what
    :func:`~shear.io.outputs.check_output_file` saw (``shear.compile(report=)`` and the CLI's
    ``--report`` check it before any work).
    """
    from shear.io.outputs import atomic_file

    text = render(d)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
