"""Draw the IR with graphviz: one colour per node group, LoRA composites boxed, overlaps shown.

Each prunable pruning group becomes a cluster of its modules (producers solid, consumers dashed);
LoRA composites are boxed double-bordered nodes; an overlap is a bold edge between a composite and
the basic node group it also belongs to; pinned spaces are listed grey with their reason.

Example:
    >>> import torch, shear
    >>> g = shear.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...                 torch.randn(1, 4))
    >>> "digraph" in to_dot(g)
    True
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shear.errors import ShearError
from shear.graph.groups import Role
from shear.graph.ir import Graph

__all__ = ["to_dot", "draw"]

_PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf",
]  # fmt: skip


def _q(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def to_dot(g: Graph, max_pinned: int = 40) -> str:
    """The graphviz source of the node-group drawing."""
    lines = [
        "digraph shear {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=10, compound=true, newrank=true];',
        '  node [shape=ellipse, fontname="Helvetica", fontsize=9, style=filled, fillcolor=white];',
        f'  label={_q(g.summary())}; labelloc=t;',
    ]
    comp_modules = {c.module for c in g.composites}
    for c in g.composites:
        ranks = ",".join(map(str, c.rank))
        label = c.module + "\\nLoRA r=" + ranks + "\\nW + s·BA"
        lines.append(f"  {_q('C:' + c.module)} [shape=box, peripheries=2, fillcolor=\"#fff7d6\", label={_q(label)}];")
    for i, p in enumerate(g.prunable_groups):
        colour = _PALETTE[i % len(_PALETTE)]
        lines.append(f"  subgraph {_q('cluster_G' + str(p.id))} {{")
        lines.append(f'    label={_q(f"G{p.id} {p.name} ({p.kind} x{p.size})")}; color="{colour}"; penwidth=2;')
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
            f'label={_q("overlap " + o.side)}, fontsize=8];'
        )
    pinned = [p for p in g.pruning_groups if not p.prunable][:max_pinned]
    if pinned:
        rows = "\\l".join(f"G{p.id} {p.name} x{p.size}: {'; '.join(p.reasons)[:90]}" for p in pinned)
        label = _q("unprunable\\l" + rows + "\\l")
        lines.append(f'  pinned [shape=note, fillcolor="#eeeeee", color="#999999", label={label}];')
    lines.append("}")
    return "\n".join(lines)


def draw(g: Graph, path: str | Path) -> Path:
    """Render the drawing to ``path`` (format from the suffix: .svg, .png, .pdf, or .dot).

    Without the graphviz ``dot`` binary, writes the ``.dot`` file next to ``path`` and raises a
    :class:`ShearError` that says how to install graphviz and render it.
    """
    path = Path(path)
    source = to_dot(g)
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
    import subprocess

    fmt = path.suffix.lstrip(".") or "svg"
    proc = subprocess.run([dot, f"-T{fmt}", "-o", str(path)], input=source, text=True, capture_output=True)
    if proc.returncode != 0:
        raise ShearError(f"graphviz failed to render {path}: {proc.stderr.strip()[:500]}")
    return path
