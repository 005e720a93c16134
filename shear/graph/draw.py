"""Draw the IR with graphviz: node groups coloured by kind, LoRA composites boxed, overlaps shown.

The default drawing is *folded* (:mod:`shear.graph.fold`): the first block of a deep model is drawn
in full — each prunable pruning group a cluster of its modules (producers solid, consumers dashed,
an edge from each producer to each consumer), LoRA composites as double-bordered boxes, the pinned
groups of the block listed with the kind of their reason — and every block identical to it is one
node "x 29 identical (layers 1-29)". A block that differs is drawn in full after it (up to
``max_full`` of them; the rest as a list of their differences). Groups that span blocks (the
residual stream) are drawn once at the top; an overlap is an edge from a composite to the other
group it belongs to (bold: its output side, dotted: its input side). Colours: channel blue, head
orange, kv family (a kv head with its query heads) red, residual green, pinned grey.

Every node and cluster of a group carries the SVG class :func:`group_class` of the group's
block-independent name, so a page can highlight a group's members together.

``fold=False`` draws every group of every block (the whole graph; unreadable past a few layers).

Example:
    >>> import torch, shear
    >>> g = shear.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...                 torch.randn(1, 4))
    >>> "digraph" in to_dot(g) and "digraph" in to_dot(g, fold=False)
    True
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

from shear.errors import ShearError
from shear.graph.fold import FoldedGraph, display_kind, fold
from shear.graph.groups import PruningGroup, Role
from shear.graph.ir import Graph
from shear.graph.pins import pin_kinds

__all__ = ["to_dot", "to_svg", "draw", "group_class", "KIND_COLOURS"]

KIND_COLOURS: dict[str, str] = {
    "channel": "#4e79a7",
    "head": "#f28e2b",
    "kv family": "#e15759",
    "residual": "#59a14f",
    "pinned": "#9a9a9a",
}
"""Colour of each display kind (:func:`shear.graph.fold.display_kind`) in drawings and reports."""

_PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf",
]  # fmt: skip


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def group_class(name: str) -> str:
    """The SVG class of a pruning group's nodes: its name with the block index folded, sanitised.

    >>> group_class("model.layers.*.mlp/channel")
    'sg-model_layers_x_mlp_channel'
    """
    return "sg-" + re.sub(r"[^A-Za-z0-9_-]", "_", name.replace("*", "x"))


def to_dot(g: Graph, max_pinned: int = 40, *, fold: bool = True, max_full: int = 3) -> str:
    """The graphviz source of the node-group drawing: folded (default) or of the whole graph.

    ``max_full`` caps the blocks drawn in full when blocks differ; ``max_pinned`` the pinned groups
    listed.
    """
    if fold:
        return _folded_dot(g, max_pinned=max_pinned, max_full=max_full)
    return _flat_dot(g, max_pinned)


def _flat_dot(g: Graph, max_pinned: int = 40) -> str:
    lines = [
        "digraph shear {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=10, compound=true, newrank=true];',
        '  node [shape=ellipse, fontname="Helvetica", fontsize=9, style=filled, fillcolor=white];',
        f"  label={_q(g.summary())}; labelloc=t;",
    ]
    comp_modules = {c.module for c in g.composites}
    for c in g.composites:
        ranks = ",".join(map(str, c.rank))
        label = c.module + "\\nLoRA r=" + ranks + "\\nW + s·BA"
        lines.append(
            f'  {_q("C:" + c.module)} [shape=box, peripheries=2, fillcolor="#fff7d6", label={_q(label)}];'
        )
    for i, p in enumerate(g.prunable_groups):
        colour = _PALETTE[i % len(_PALETTE)]
        lines.append(f"  subgraph {_q('cluster_G' + str(p.id))} {{")
        lines.append(
            f'    label={_q(f"G{p.id} {p.name} ({p.kind} x{p.size})")}; color="{colour}"; penwidth=2;'
        )
        producers = {m.param.rsplit(".", 1)[0] for m in p.members if m.role is Role.PRIMARY}
        for mod in p.modules:
            node_id = f"G{p.id}:{mod}"
            style = "filled" if any(x.startswith(mod) for x in producers) else "filled,dashed"
            boxed = ", shape=box" if mod in comp_modules else ""
            lines.append(f'    {_q(node_id)} [label={_q(mod)}, style="{style}", color="{colour}"{boxed}];')
        lines.append("  }")
        if len(p.modules) > 1:
            first = f"G{p.id}:{p.modules[0]}"
            for mod in p.modules[1:]:
                lines.append(f'  {_q(first)} -> {_q(f"G{p.id}:{mod}")} [color="{colour}"];')
    for o in g.overlaps:
        comp = g.node_groups[o.composed].name
        basic = g.pruning_groups[g.node_groups[o.basic].pruning_groups[0]]
        if not basic.prunable:
            continue
        style = "bold" if o.side == "output" else "dotted"
        lines.append(
            f'  {_q("C:" + comp)} -> {_q(f"G{basic.id}:{comp}")} [style={style}, color="#c04000", '
            f"label={_q('overlap ' + o.side)}, fontsize=8];"
        )
    pinned = [p for p in g.pruning_groups if not p.prunable][:max_pinned]
    if pinned:
        rows = "\\l".join(f"G{p.id} {p.name} x{p.size}: {'; '.join(p.reasons)[:90]}" for p in pinned)
        label = _q("unprunable\\l" + rows + "\\l")
        lines.append(f'  pinned [shape=note, fillcolor="#eeeeee", color="#999999", label={label}];')
    lines.append("}")
    return "\n".join(lines)


# -- folded drawing ---------------------------------------------------------------------------------


def _colour(p: PruningGroup) -> str:
    return KIND_COLOURS[display_kind(p)] if p.prunable else KIND_COLOURS["pinned"]


def _short(name: str, keep: int = 2) -> str:
    """The last ``keep`` dotted parts of a module name (``mlp.down_proj``)."""
    head, _, tail = name.partition("/")
    short = ".".join(head.split(".")[-keep:])
    return short + ("/" + tail if tail else "")


def _lines(items: list[str], limit: int) -> str:
    if len(items) > limit:
        items = items[: limit - 1] + [f"... {len(items) - limit + 1} more"]
    return "\\l".join(items) + "\\l"


def _folded_name(fg: FoldedGraph, name: str) -> str:
    """``layers.*.mlp.down_proj`` for a name inside the blocks, the last two parts otherwise."""
    if "*" in name and fg.container is not None:
        return ".".join(fg.container.split(".")[-1:] + ["*"]) + "." + fg.local(name.replace("*", "0"))
    return _short(name, 2)


def _global_label(fg: FoldedGraph, p: PruningGroup) -> str:
    mods = [_folded_name(fg, m) + (f" x{n}" if n > 1 else "") for m, n in fg.module_counts(p)]
    return f"{_short(p.name, 1)} x{p.size} ({display_kind(p)})" + "\\n" + _lines(mods, 6)


def _block_lines(fg: FoldedGraph, b: int, title: str, max_pinned: int) -> tuple[list[str], str]:
    """The cluster of block ``b`` drawn in full, and the id of its anchor node."""
    comp = {c.module: c for c in fg.composites.get(b, [])}
    drawn: set[str] = set()
    anchor = f"B{b}:anchor"
    out = [
        f"  subgraph {_q(f'cluster_B{b}')} {{",
        f'    label={_q(title)}; labeljust=l; color="#555555"; style="rounded"; penwidth=1.5;',
        f"    {_q(anchor)} [shape=point, width=0.01, style=invis];",
    ]
    for p in fg.blocks.get(b, []):
        if not p.prunable:
            continue
        colour = _colour(p)
        cls = group_class(fg.template(p.name))
        out.append(f"    subgraph {_q(f'cluster_B{b}G{p.id}')} {{")
        out.append(
            f'      label={_q(f"{fg.local(p.name)} x{p.size} ({display_kind(p)})")}; color="{colour}"; '
            f'fontcolor="{colour}"; penwidth=2; style="rounded"; class="{cls}";'
        )
        producers = [
            m
            for m in p.modules
            if any(x.param.startswith(m + ".") and x.role is Role.PRIMARY for x in p.members)
        ]
        for mod in p.modules:
            node = f"B{b}G{p.id}:{mod}"
            is_producer = mod in producers
            style = "filled" if is_producer else "filled,dashed"
            c = comp.get(mod)
            if c is not None:
                drawn.add(mod)
                label = fg.local(mod) + "\\nLoRA r=" + ",".join(map(str, c.rank)) + ": W + s·BA"
                shape = 'shape=box, peripheries=2, fillcolor="#fff7d6"'
            else:
                label = fg.local(mod)
                shape = 'shape=ellipse, fillcolor="white"'
            out.append(
                f'      {_q(node)} [label={_q(label)}, {shape}, style="{style}", color="{colour}", class="{cls}"];'
            )
        out.append("    }")
        for src in producers:
            for dst in p.modules:
                if dst not in producers:
                    out.append(
                        f'    {_q(f"B{b}G{p.id}:{src}")} -> {_q(f"B{b}G{p.id}:{dst}")} [color="{colour}", class="{cls}"];'
                    )
    for mod, c in comp.items():
        if mod not in drawn:
            label = fg.local(mod) + "\\nLoRA r=" + ",".join(map(str, c.rank)) + ": W + s·BA"
            out.append(
                f'    {_q(f"B{b}:{mod}")} [label={_q(label)}, shape=box, peripheries=2, style=filled, fillcolor="#fff7d6"];'
            )
    pinned = [p for p in fg.blocks.get(b, []) if not p.prunable]
    if pinned:
        rows = [f"{fg.local(p.name)} x{p.size}: {', '.join(pin_kinds(p.reasons))}" for p in pinned]
        note = _q("pinned here\\l" + _lines(rows, max_pinned))
        out.append(
            f'    {_q(f"B{b}:pinned")} [shape=note, style=filled, fillcolor="#f2f2f2", color="#aaaaaa", '
            f"fontsize=8, label={note}];"
        )
    out.append("  }")
    return out, anchor


def _overlap_edges(fg: FoldedGraph, b: int, targets: dict[int, str]) -> list[str]:
    """Edges from the composites of block ``b`` to the global groups they also belong to."""
    g = fg.graph
    local_ids = {p.id for p in fg.blocks.get(b, []) if p.prunable}
    out = []
    for o in fg.overlaps.get(b, []):
        basic = g.node_groups[o.basic]
        pid = basic.pruning_groups[0] if basic.pruning_groups else -1
        if pid in local_ids or pid not in targets:
            continue
        p = g.pruning_groups[pid]
        module = g.node_groups[o.composed].name
        src = next(
            (f"B{b}G{q.id}:{module}" for q in fg.blocks.get(b, []) if q.prunable and module in q.modules),
            f"B{b}:{module}",
        )
        style = "bold" if o.side == "output" else "dotted"
        out.append(
            f'  {_q(src)} -> {_q(targets[pid])} [style={style}, color="{_colour(p)}", constraint=false, '
            f'arrowhead=none, tooltip={_q(f"overlap ({o.side} side): {module}")}, class="{group_class(fg.template(p.name))}"];'
        )
    return out


def _folded_dot(g: Graph, max_pinned: int = 40, max_full: int = 3) -> str:
    fg = fold(g)
    word = "layers"
    lines = _dot_header(g, fg)
    targets: dict[int, str] = {}
    chain: list[tuple[str, str | None]] = []  # (node, cluster name for compound edges)
    tops = [p for p in fg.global_groups if p.prunable]
    if tops:
        lines.append("  { rank=min;")
        for p in tops:
            node = f"G{p.id}"
            targets[p.id] = node
            lines.append(
                f'    {_q(node)} [shape=box, style="rounded,filled", fillcolor="{_colour(p)}22", color="{_colour(p)}", '
                f'penwidth=2, label={_q(_global_label(fg, p))}, class="{group_class(fg.template(p.name))}"];'
            )
        lines.append("  }")
        chain.append((targets[tops[0].id], None))
    outside = [c for c in fg.composites.get(-1, [])]
    if fg.container is None:
        # nothing repeats: one "block" holds every group
        fg.blocks = {0: [p for p in g.pruning_groups if p not in fg.global_groups]}
        fg.composites = {0: list(g.composites)}
        fg.overlaps = {0: list(g.overlaps)}
        block, anchor = _block_lines(fg, 0, "", max_pinned)
        lines += block
        lines += _overlap_edges(fg, 0, targets)
        outside = []
    full_drawn: list[int] = []
    spill: list[str] = []

    def flush_spill() -> None:
        if spill:
            node = f"spill{len(chain)}"
            note = _q(f"differing {word} not drawn in full\\l" + _lines(list(spill), 14))
            lines.append(
                f'  {_q(node)} [shape=note, style=filled, fillcolor="#fdf1e0", color="#c08a3e", fontsize=8, '
                f"label={note}];"
            )
            chain.append((node, None))
            spill.clear()

    for r in fg.runs:
        if r.full == r.first and r.first not in full_drawn:
            if len(full_drawn) < max_full:
                flush_spill()
                title = f"{word} {r.first}"
                if r.differences:
                    more = "; ..." if len(r.differences) > 4 else ""
                    title += "  (differs: " + "; ".join(r.differences[:4]) + more + ")"
                block, anchor = _block_lines(fg, r.first, title, max_pinned)
                lines += block
                lines += _overlap_edges(fg, r.first, targets)
                chain.append((anchor, f"cluster_B{r.first}"))
                full_drawn.append(r.first)
            else:
                span = f"{r.first}" if r.count == 1 else f"{r.first}-{r.last}"
                spill.append(f"{word} {span}: " + "; ".join(r.differences))
                continue
        label = r.label(word)
        if label is None:
            continue
        if r.full not in full_drawn:
            span = f"{r.first}" if r.count == 1 else f"{r.first}-{r.last}"
            spill.append(f"{word} {span}: like {word[:-1]} {r.full}")
            continue
        flush_spill()
        node = f"fold{r.first}"
        lines.append(
            f'  {_q(node)} [shape=box3d, style=filled, fillcolor="#eef3f8", color="#555555", fontsize=11, label={_q(label)}];'
        )
        chain.append((node, None))
    flush_spill()
    for c in outside:
        node = f"C:{c.module}"
        label = _short(c.module, 2) + "\\nLoRA r=" + ",".join(map(str, c.rank)) + ": W + s·BA"
        lines.append(
            f'  {_q(node)} [label={_q(label)}, shape=box, peripheries=2, style=filled, fillcolor="#fff7d6"];'
        )
        chain.append((node, None))
    for o in fg.overlaps.get(-1, []):
        basic = g.node_groups[o.basic]
        pid = basic.pruning_groups[0] if basic.pruning_groups else -1
        if pid in targets:
            style = "bold" if o.side == "output" else "dotted"
            lines.append(
                f"  {_q('C:' + g.node_groups[o.composed].name)} -> {_q(targets[pid])} [style={style}, "
                f'color="{_colour(g.pruning_groups[pid])}", constraint=false, arrowhead=none];'
            )
    lines += _dot_footer(g, fg, chain, word, max_pinned)
    return "\n".join(lines)


def _dot_header(g: Graph, fg: FoldedGraph) -> list[str]:
    """The opening lines of the folded DOT: graph attributes and the title (groups, folded blocks)."""
    n_blocks = sum(r.count for r in fg.runs)
    title = (
        f"{g.model_class}: {len(g.pruning_groups)} pruning groups ({len(g.prunable_groups)} prunable, "
        f"{g.num_structures()} structures), {len(g.composites)} LoRA composites"
    )
    if fg.container is not None:
        where = fg.container or "<root>"
        title += "\\n" + f"{n_blocks} blocks under {where}: {fg.distinct} drawn in full, the rest folded"
    return [
        "digraph shear {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, compound=true, newrank=true, nodesep=0.25, ranksep=0.35];',
        '  node [shape=ellipse, fontname="Helvetica", fontsize=9, style=filled, fillcolor=white];',
        '  edge [color="#888888", arrowsize=0.6];',
        f"  label={_q(title)}; labelloc=t;",
    ]


def _dot_footer(g: Graph, fg: FoldedGraph, chain: list[tuple[str, str | None]], word: str, max_pinned: int) -> list[str]:
    """The closing lines: the note of groups pinned across blocks, the edges chaining the drawn
    parts top to bottom (``chain`` gains the note), the legend and the closing brace."""
    lines: list[str] = []
    pinned = [p for p in fg.global_groups if not p.prunable]
    if pinned:
        rows = [f"{_folded_name(fg, p.name)} x{p.size}: {', '.join(pin_kinds(p.reasons))}" for p in pinned]
        note = _q(f"pinned across {word}\\l" + _lines(rows, max_pinned))
        lines.append(
            f'  pinned [shape=note, fillcolor="#eeeeee", color="#999999", fontsize=8, label={note}];'
        )
        chain.append(("pinned", None))
    for (a, ca), (b, cb) in zip(chain, chain[1:]):
        attrs = ['color="#bbbbbb"', "penwidth=1.5"]
        if ca:
            attrs.append(f'ltail="{ca}"')
        if cb:
            attrs.append(f'lhead="{cb}"')
        lines.append(f"  {_q(a)} -> {_q(b)} [{', '.join(attrs)}];")
    kinds = Counter(display_kind(p) for p in g.prunable_groups)
    legend = "  ".join(f"{k}: {n}" for k, n in kinds.items())
    key = _q(
        f"groups by kind  {legend}\\nboxed: LoRA composite (W + s·BA);  solid: producer, dashed: consumer;  "
        "overlap edge bold: output side, dotted: input side"
    )
    lines.append(f'  legend [shape=plaintext, style="", fontsize=8, label={key}];')
    lines.append(f"  {_q(chain[-1][0])} -> legend [style=invis];" if chain else "")
    lines.append("}")
    return lines


def to_svg(g: Graph, *, fold: bool = True) -> str:
    """The drawing as SVG text (needs graphviz's ``dot``; raises :class:`ShearError` without it)."""
    return _render(to_dot(g, fold=fold), "svg").decode()


def _render(source: str, fmt: str) -> bytes:
    import subprocess

    dot = shutil.which("dot")
    if dot is None:
        raise ShearError(
            "graphviz's `dot` binary was not found. Install graphviz (Debian/Ubuntu: apt-get install graphviz; "
            "macOS: brew install graphviz)"
        )
    proc = subprocess.run([dot, f"-T{fmt}"], input=source.encode(), capture_output=True)
    if proc.returncode != 0:
        raise ShearError(
            f"graphviz failed to render the drawing: {proc.stderr.decode(errors='replace').strip()[:500]}"
        )
    return proc.stdout


def draw(g: Graph, path: str | Path, *, fold: bool = True) -> Path:
    """Render the drawing to ``path`` (format from the suffix: .svg, .png, .pdf, or .dot).

    ``fold=False`` draws every block (see :func:`to_dot`).

    Without the graphviz ``dot`` binary, writes the ``.dot`` file next to ``path`` and raises a
    :class:`ShearError` that says how to install graphviz and render it.
    """
    path = Path(path)
    source = to_dot(g, fold=fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".dot":
        path.write_text(source)
        return path
    dot = shutil.which("dot")
    if dot is None:
        dot_path = path.with_suffix(".dot")
        dot_path.write_text(source)
        raise ShearError(
            f"graphviz's `dot` binary was not found, so {path} was not rendered; wrote {dot_path} instead. "
            f"Install graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) "
            f"and run: dot -T{path.suffix.lstrip('.') or 'svg'} {dot_path} -o {path}"
        )
    try:
        path.write_bytes(_render(source, path.suffix.lstrip(".") or "svg"))
    except ShearError as e:
        raise ShearError(f"{e} (while rendering {path})") from e
    return path
