"""Fold repeated blocks of the IR: one decoder layer stands for every layer identical to it.

A deep model repeats one block (``model.layers.0`` ... ``model.layers.29``); drawn flat, its node
groups make a drawing 85,000 pt wide. :func:`fold` finds the numbered container whose children own
the most groups (``model.layers``), gives each child block a *signature* — its pruning groups
(kind, size, pin kinds, members), LoRA composites and overlaps, with the block index replaced by
``*`` — and splits the blocks into runs of equal signature. The drawing then shows the first block
of each distinct signature in full and every other block as "x N identical (layers a-b)"; a block
that differs (a pruned layer with other widths, a layer with another MLP) gets its own entry and
the differences spelled out.

Groups whose modules span several blocks (the residual stream, a head_dim shared by every layer)
or none (embedding, lm_head) are *global*: drawn once, outside the blocks.

Example:
    >>> import torch, shear
    >>> mlp = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> f = fold(shear.trace(torch.nn.Sequential(*[mlp() for _ in range(5)]), torch.randn(1, 4)))
    >>> [(r.first, r.last, r.full) for r in f.runs]  # block 0 reads the input, block 4 writes the output
    [(0, 0, 0), (1, 3, 1), (4, 4, 4)]
    >>> f.runs[1].label()
    'x 2 identical (layers 2-3)'
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from shear.graph.groups import PruningGroup, Role
from shear.graph.ir import Graph, LoraComposite, Overlap
from shear.graph.pins import pin_kinds

__all__ = ["FoldedGraph", "BlockRun", "fold", "display_kind", "repeated_container", "split_block", "KINDS"]

KINDS: tuple[str, ...] = ("channel", "head", "kv family", "residual")
"""Display kinds of pruning groups, the ones a drawing colours differently."""

_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|/|$)")


def display_kind(p: PruningGroup) -> str:
    """``channel``, ``head``, ``kv family`` (a kv head with its query heads, GQA) or ``residual``.

    A head group is a kv family when its query projection owns more rows per structure than its
    key projection (``k`` differs between primary members).
    """
    if p.kind == "head":
        ks = {m.k for m in p.members if m.role is Role.PRIMARY and m.dim == 0}
        return "kv family" if len(ks) > 1 else "head"
    return p.kind if p.kind in KINDS else "channel"


def repeated_container(names: list[str]) -> str | None:
    """The ``prefix`` whose numbered children ``prefix.<i>`` appear under the most distinct indices.

    >>> repeated_container(["model.layers.0.mlp", "model.layers.1.mlp", "model.embed_tokens"])
    'model.layers'
    """
    seen: dict[str, set[int]] = {}
    for name in names:
        for m in _INDEX.finditer(name):
            prefix = name[: m.start(1)].rstrip(".")
            seen.setdefault(prefix, set()).add(int(m.group(1)))
    best = max(seen.items(), key=lambda kv: (len(kv[1]), -len(kv[0])), default=None)
    return best[0] if best is not None and len(best[1]) > 1 else None


def split_block(container: str | None, name: str) -> tuple[str, int, str] | None:
    """``(head, index, tail)`` with ``head + str(index) + tail == name`` for a name in block ``index``.

    >>> split_block("model.layers", "base_model.model.model.layers.12.mlp/channel")
    ('base_model.model.model.layers.', 12, '.mlp/channel')
    >>> split_block("model.layers", "model.norm") is None
    True
    """
    if container is None:
        return None
    if container == "":
        m = re.match(r"(\d+)(?=[./]|$)", name)
        return ("", int(m.group(1)), name[m.end() :]) if m else None
    prefix = container + "."
    at = name.find(prefix)
    while at > 0 and name[at - 1] != ".":
        at = name.find(prefix, at + 1)
    if at < 0:
        return None
    m = re.match(r"(\d+)(?=[./]|$)", name[at + len(prefix) :])
    if m is None:
        return None
    head = name[: at + len(prefix)]
    return head, int(m.group(1)), name[len(head) + m.end() :]


@dataclass(frozen=True)
class BlockRun:
    """Consecutive blocks ``first..last`` with one signature; ``full`` is the block drawn in full."""

    first: int
    last: int
    full: int
    """Index of the block that shows this signature in full (``first`` for the first run of it)."""
    differences: tuple[str, ...] = ()
    """How this signature differs from the first block's (empty for the first block's runs)."""

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def label(self, word: str = "layers") -> str | None:
        """The folded node of this run: the blocks not drawn in full (``None`` when there are none).

        A run that starts with its full block folds the rest, "x 29 identical (layers 1-29)"; a
        run of blocks equal to an earlier one folds all, "x 5 identical to layer 0 (layers 7-11)".
        """
        first = self.first + 1 if self.full == self.first else self.first
        if first > self.last:
            return None
        n = self.last - first + 1
        span = f"{word[:-1] if n == 1 and word.endswith('s') else word} {first}" + (
            f"-{self.last}" if n > 1 else ""
        )
        to = "" if self.full == self.first else f" to {word[:-1] if word.endswith('s') else word} {self.full}"
        return f"x {n} identical{to} ({span})"


@dataclass
class FoldedGraph:
    """The graph with its blocks grouped: which blocks are identical, which groups are global."""

    graph: Graph
    container: str | None
    """Module path of the numbered container (``model.layers``), ``None`` when nothing repeats."""
    blocks: dict[int, list[PruningGroup]] = field(default_factory=dict)
    """Pruning groups local to each block, in graph order."""
    global_groups: list[PruningGroup] = field(default_factory=list)
    composites: dict[int, list[LoraComposite]] = field(default_factory=dict)
    """LoRA composites in each block (``-1``: outside every block)."""
    overlaps: dict[int, list[Overlap]] = field(default_factory=dict)
    runs: list[BlockRun] = field(default_factory=list)
    signatures: dict[int, tuple[object, ...]] = field(default_factory=dict)

    def _split(self, name: str) -> tuple[str, int, str] | None:
        return split_block(self.container, name)

    def block_of(self, name: str) -> int | None:
        """The block index of a module/parameter/group name, ``None`` outside every block."""
        parts = self._split(name)
        return parts[1] if parts is not None else None

    def template(self, name: str) -> str:
        """``name`` with its block index replaced by ``*``."""
        parts = self._split(name)
        return name if parts is None else parts[0] + "*" + parts[2]

    def local(self, name: str) -> str:
        """``name`` relative to its block (``self_attn.q_proj``), or the whole name outside blocks."""
        parts = self._split(name)
        return name if parts is None else (parts[2].lstrip("./") or name)

    @property
    def distinct(self) -> int:
        """Number of blocks drawn in full."""
        return len({r.full for r in self.runs})

    def module_counts(self, p: PruningGroup) -> list[tuple[str, int]]:
        """The group's modules, block index folded: ``[("model.layers.*.mlp.down_proj", 30), ...]``."""
        counts = Counter(self.template(m) for m in p.modules)
        return sorted(counts.items(), key=lambda kv: (kv[0].count("*"), kv[0]))


def _group_blocks(fg: FoldedGraph, p: PruningGroup) -> set[int | None]:
    names = list(p.modules) or [m.param for m in p.members]
    return {fg.block_of(n) for n in names}


def _signature(fg: FoldedGraph, b: int) -> tuple[object, ...]:
    g = fg.graph
    groups = tuple(
        sorted(
            (
                fg.template(p.name),
                p.kind,
                p.size,
                p.prunable,
                pin_kinds(p.reasons),
                tuple(sorted((fg.template(m.param), m.dim, m.role.value, m.k) for m in p.members)),
            )
            for p in fg.blocks.get(b, [])
        )
    )
    comps = tuple(sorted((fg.template(c.module), c.rank, c.adapters) for c in fg.composites.get(b, [])))
    overlaps = tuple(
        sorted(
            (fg.template(g.node_groups[o.composed].name), fg.template(g.node_groups[o.basic].name), o.side)
            for o in fg.overlaps.get(b, [])
        )
    )
    return (groups, comps, overlaps)


def _differences(fg: FoldedGraph, first: int, other: int) -> tuple[str, ...]:
    """Readable differences between two blocks: sizes that changed, groups only one of them has."""
    a = {fg.template(p.name): p for p in fg.blocks.get(first, [])}
    b = {fg.template(p.name): p for p in fg.blocks.get(other, [])}
    out = []
    for name in sorted(a.keys() | b.keys()):
        short = fg.local(name.replace("*", str(other)))
        pa, pb = a.get(name), b.get(name)
        if pa is None:
            out.append(f"+ {short} x{pb.size}")  # type: ignore[union-attr]
        elif pb is None:
            out.append(f"- {short} x{pa.size}")
        elif pa.size != pb.size:
            out.append(f"{short}: {pa.size} -> {pb.size}")
        elif pa.prunable != pb.prunable:
            out.append(f"{short}: {'pinned' if pa.prunable else 'prunable'} here")
        elif len(pa.members) != len(pb.members):
            out.append(f"{short}: {len(pb.members)} members (not {len(pa.members)})")
    ca = {fg.template(c.module): c.rank for c in fg.composites.get(first, [])}
    cb = {fg.template(c.module): c.rank for c in fg.composites.get(other, [])}
    if ca != cb:
        out.append(f"LoRA composites: {len(cb)} (not {len(ca)})")
    return tuple(out) or ("other members or overlaps",)


def fold(g: Graph) -> FoldedGraph:
    """Group the blocks of ``g`` into runs of identical ones (see the module docstring)."""
    names = [m for p in g.pruning_groups for m in p.modules] + [c.module for c in g.composites]
    fg = FoldedGraph(graph=g, container=repeated_container(names))
    for p in g.pruning_groups:
        where = _group_blocks(fg, p)
        if len(where) == 1 and None not in where:
            fg.blocks.setdefault(where.pop(), []).append(p)  # type: ignore[arg-type]
        else:
            fg.global_groups.append(p)
    for c in g.composites:
        b = fg.block_of(c.module)
        fg.composites.setdefault(-1 if b is None else b, []).append(c)
    for o in g.overlaps:
        b = fg.block_of(g.node_groups[o.composed].name)
        fg.overlaps.setdefault(-1 if b is None else b, []).append(o)
    indices = sorted(set(fg.blocks) | {k for k in fg.composites if k >= 0})
    fg.signatures = {b: _signature(fg, b) for b in indices}
    full_of: dict[tuple[object, ...], int] = {}
    for b in indices:
        sig = fg.signatures[b]
        full = full_of.setdefault(sig, b)
        prev = fg.runs[-1] if fg.runs else None
        if prev is not None and prev.full == full and prev.last == b - 1:
            fg.runs[-1] = BlockRun(prev.first, b, full, prev.differences)
        else:
            diff = () if full == indices[0] or full != b else _differences(fg, indices[0], b)
            if full != b:
                diff = next(r.differences for r in fg.runs if r.full == full)
            fg.runs.append(BlockRun(b, b, full, diff))
    return fg
