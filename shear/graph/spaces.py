"""Channel spaces: a union-find over tensor-dimension classes with product and sum refinements.

Every dimension of every tensor in the traced graph is described by one *space* (an integer id).
Ops join spaces (``x + y`` joins the aligned dims of ``x`` and ``y``), and layout ops refine them:

* a **product** refinement says a space is the row-major product of smaller spaces (a projection's
  output ``[H * D]`` viewed as heads ``[H, D]``: index ``h * D + d``);
* a **sum** refinement says a space is the concatenation of smaller spaces (a fused qkv output
  split in three; RoPE's ``rotate_half`` halves).

Joining two refined spaces joins their children at the common granularity, so after a fixpoint
each *leaf* space is an equivalence class of indices that must be removed together, and every
tensor dimension is a tree over leaves. Refinements only ever create strictly smaller spaces, so
every walk over the tree terminates (a cycle such as RoPE's cat cannot grow a space forever).
Conflicts that cannot be expressed (a product joined with an incompatible sum) pin the spaces:
unknown is unprunable, never guessed.

Example:
    >>> s = SpaceTable()
    >>> q = s.new(12, "q_proj.out")
    >>> heads, head_dim = s.split_prod(q, (3, 4))
    >>> s.pin(head_dim, "head_dim")
    >>> s.is_pinned(heads), s.is_pinned(head_dim)
    (False, True)
    >>> sorted(s.expand(q)[s.find(heads)][0].tolist())[:5]
    [0, 0, 0, 0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shear.errors import GraphError

__all__ = ["SpaceTable", "Refinement"]


@dataclass(frozen=True)
class Refinement:
    """How a space decomposes: ``kind`` is ``"prod"`` (row-major) or ``"sum"`` (concatenation)."""

    kind: str
    children: tuple[int, ...]


class SpaceTable:
    """Union-find of spaces with sizes, refinements, pins (with reasons) and labels."""

    def __init__(self) -> None:
        self._parent: list[int] = []
        self._size: list[int] = []
        self._label: list[str] = []
        self._refine: dict[int, Refinement] = {}
        self._pins: dict[int, list[str]] = {}

    # ------------------------------------------------------------------ basics
    def new(self, size: int, label: str = "") -> int:
        """A fresh space of ``size`` indices."""
        if size < 1:
            raise GraphError(f"space size must be positive, got {size}")
        self._parent.append(len(self._parent))
        self._size.append(size)
        self._label.append(label)
        return len(self._parent) - 1

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def size(self, x: int) -> int:
        return self._size[self.find(x)]

    def label(self, x: int) -> str:
        return self._label[self.find(x)]

    def refinement(self, x: int) -> Refinement | None:
        return self._refine.get(self.find(x))

    def compose(self, kind: str, children: list[int]) -> int:
        """A new space defined as the product or concatenation of existing ones."""
        kids = tuple(self.find(c) for c in children)
        if len(kids) == 1:
            return kids[0]
        n = self.new(_combine(kind, [self.size(c) for c in kids]), f"{kind}({self._label[kids[0]]},...)")
        self._refine[n] = Refinement(kind, kids)
        return n

    def prod_atoms(self, x: int) -> list[int]:
        """``x`` flattened along product refinements (the factors a reshape may regroup)."""
        r = self.find(x)
        ref = self._refine.get(r)
        if ref is None or ref.kind != "prod":
            return [r]
        out: list[int] = []
        for c in ref.children:
            out.extend(self.prod_atoms(c))
        return out

    # ------------------------------------------------------------------ pins
    def pin(self, x: int, reason: str) -> None:
        """Mark ``x`` and everything it decomposes into as unprunable, recording why."""
        stack = [self.find(x)]
        seen: set[int] = set()
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            reasons = self._pins.setdefault(r, [])
            if reason not in reasons:
                reasons.append(reason)
            ref = self._refine.get(r)
            if ref is not None:
                stack.extend(ref.children)

    def pin_inner_factors(self, reason: str) -> int:
        """Pin the inner factors of every product whose outer factor can still be pruned.

        In ``heads x head_dim`` a head and a head_dim coordinate (of every head) share indices: the
        coordinate could only go where no head stays, so it is pruned with whole heads or not at all.
        Returns the number of leaves pinned.
        """
        pinned = 0
        for r, ref in list(self._refine.items()):
            if self.find(r) != r or ref.kind != "prod":
                continue
            if all(self.is_pinned(leaf) for leaf in self.leaves(ref.children[0])):
                continue
            for child in ref.children[1:]:
                for leaf in self.leaves(child):
                    if not self.is_pinned(leaf):
                        self.pin(leaf, reason)
                        pinned += 1
        return pinned

    def is_pinned(self, x: int) -> bool:
        return self.find(x) in self._pins

    def pin_reasons(self, x: int) -> tuple[str, ...]:
        return tuple(self._pins.get(self.find(x), ()))

    # ------------------------------------------------------------------ refinement
    def _set_refinement(self, root: int, kind: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
        base = self._label[root]
        children = tuple(self.new(s, f"{base}.{kind}{i}") for i, s in enumerate(sizes))
        self._refine[root] = Refinement(kind, children)
        if root in self._pins:
            for reason in list(self._pins[root]):
                for c in children:
                    self.pin(c, reason)
        return children

    def split_prod(self, x: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Refine ``x`` as the row-major product of spaces of ``sizes``; returns them.

        Sizes of 1 are dropped (they carry no channel). Compatible with an existing product
        refinement; an incompatible layout pins ``x`` and returns fresh pinned spaces.
        """
        sizes = tuple(s for s in sizes if s != 1)
        r = self.find(x)
        if _prod(sizes) != self._size[r]:
            raise GraphError(f"product {sizes} does not match space size {self._size[r]}")
        if len(sizes) <= 1:
            return (r,) if sizes else ()
        return self._cut(r, "prod", sizes)

    def split_sum(self, x: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Refine ``x`` as the concatenation of spaces of ``sizes`` (zero sizes are dropped)."""
        sizes = tuple(s for s in sizes if s != 0)
        r = self.find(x)
        if sum(sizes) != self._size[r]:
            raise GraphError(f"segments {sizes} do not match space size {self._size[r]}")
        if len(sizes) == 1:
            return (r,)
        return self._cut(r, "sum", sizes)

    def _cut(self, r: int, kind: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Spaces covering root ``r`` at the boundaries of ``sizes`` (refining as needed)."""
        ref = self._refine.get(r)
        if ref is None:
            return self._set_refinement(r, kind, sizes)
        if ref.kind != kind:
            return self._conflict(r, kind, sizes)
        child_sizes = tuple(self.size(c) for c in ref.children)
        if child_sizes == sizes:
            return tuple(self.find(c) for c in ref.children)
        # Common refinement: cut each existing child at the requested boundaries, then regroup.
        pieces = self._pieces(ref, kind, sizes)
        if pieces is None:
            return self._conflict(r, kind, sizes)
        out: list[int] = []
        for group in pieces:
            if len(group) == 1:
                out.append(group[0])
            else:
                n = self.new(_combine(kind, [self.size(g) for g in group]), f"{self._label[r]}.{kind}")
                self._refine[n] = Refinement(kind, tuple(group))
                if self.is_pinned(r) and all(self.is_pinned(g) for g in group):
                    for reason in self.pin_reasons(r):
                        self._pins.setdefault(n, []).append(reason)
                out.append(n)
        return tuple(out)

    def _pieces(self, ref: Refinement, kind: str, sizes: tuple[int, ...]) -> list[list[int]] | None:
        """Regroup ``ref``'s children, cut finer where needed, into runs matching ``sizes``."""
        have = [self.size(c) for c in ref.children]
        cuts_have = _boundaries(kind, have)
        cuts_want = _boundaries(kind, list(sizes))
        merged = sorted(set(cuts_have) | set(cuts_want))
        if kind == "prod" and any(b % a for a, b in zip(merged, merged[1:])):
            return None
        fine: list[int] = []
        for child, lo_hi in zip(ref.children, _spans(kind, have)):
            lo, hi = lo_hi
            inner = [b for b in merged if lo < b < hi]
            if not inner:
                fine.append(self.find(child))
                continue
            pts = [lo, *inner, hi]
            sub = tuple(_between(kind, a, b) for a, b in zip(pts, pts[1:]))
            fine.extend(self._cut(self.find(child), kind, sub))
        prev = _identity(kind)
        runs: list[list[int]] = []
        acc: list[int] = []
        targets = iter(cuts_want)
        target = next(targets)
        for f in fine:
            acc.append(f)
            prev = _advance(kind, prev, self.size(f))
            if prev == target:
                runs.append(acc)
                acc = []
                target = next(targets, -1)
        return runs if not acc else None

    def _conflict(self, r: int, kind: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
        reason = f"conflicting layouts ({self._refine[r].kind} vs {kind} {list(sizes)})"
        self.pin(r, reason)
        out = tuple(self.new(s, f"{self._label[r]}.conflict") for s in sizes)
        for o in out:
            self.pin(o, reason)
        return out

    # ------------------------------------------------------------------ union
    def union(self, a: int, b: int) -> int:
        """Join two spaces of equal size: index ``i`` of one is index ``i`` of the other."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self._size[ra] != self._size[rb]:
            raise GraphError(f"cannot join spaces of sizes {self._size[ra]} and {self._size[rb]}")
        fa, fb = self._refine.get(ra), self._refine.get(rb)
        if ra > rb:  # keep the older id as root: stable names
            ra, rb, fa, fb = rb, ra, fb, fa
        self._parent[rb] = ra
        pins_b = self._pins.pop(rb, [])
        if fb is not None:
            del self._refine[rb]
        if fa is None and fb is not None:
            self._refine[ra] = fb
        elif fa is not None and fb is not None:
            other = self._cut_children(ra, fb)
            mine = tuple(self.find(c) for c in self._refine[ra].children) if ra in self._refine else ()
            if len(mine) == len(other):
                for x, y in zip(mine, other):
                    self.union(x, y)
        for reason in pins_b:
            self.pin(ra, reason)
        if ra in self._pins:
            for reason in list(self._pins[ra]):
                self.pin(ra, reason)
        return self.find(ra)

    def _cut_children(self, root: int, other: Refinement) -> tuple[int, ...]:
        """Bring ``root``'s refinement and ``other`` to a common granularity; return other's cut."""
        mine = self._refine[root]
        if mine.kind != other.kind:
            self.pin(root, f"conflicting layouts ({mine.kind} vs {other.kind})")
            for c in other.children:
                self.pin(c, f"conflicting layouts ({mine.kind} vs {other.kind})")
            return ()
        kind = mine.kind
        sizes_o = tuple(self.size(c) for c in other.children)
        sizes_m = tuple(self.size(c) for c in mine.children)
        if sizes_o == sizes_m:
            return tuple(self.find(c) for c in other.children)
        merged = sorted(set(_boundaries(kind, list(sizes_o))) | set(_boundaries(kind, list(sizes_m))))
        fine_sizes = tuple(_between(kind, a, b) for a, b in zip([_identity(kind), *merged], merged))
        if kind == "prod" and any(b % a for a, b in zip(merged, merged[1:])):
            self.pin(root, "conflicting product layouts")
            for c in other.children:
                self.pin(c, "conflicting product layouts")
            return ()
        mine_fine = self._cut(root, kind, fine_sizes)
        tmp = self.new(self._size[root], "tmp")
        self._refine[tmp] = other
        other_fine = self._cut(tmp, kind, fine_sizes)
        self._refine[root] = Refinement(kind, mine_fine)
        return other_fine

    # ------------------------------------------------------------------ expansion
    def leaves(self, x: int) -> list[int]:
        """Leaf spaces of ``x`` in layout order (a leaf may occur more than once)."""
        r = self.find(x)
        ref = self._refine.get(r)
        if ref is None:
            return [r]
        out: list[int] = []
        for c in ref.children:
            out.extend(self.leaves(c))
        return out

    def expand(self, x: int) -> dict[int, list[torch.Tensor]]:
        """For each leaf of ``x``: one long tensor per occurrence, giving at every flat position of
        ``x`` the leaf's index there, or -1 where this occurrence does not cover the position."""
        r = self.find(x)
        n = self._size[r]
        ref = self._refine.get(r)
        if ref is None:
            return {r: [torch.arange(n)]}
        out: dict[int, list[torch.Tensor]] = {}
        if ref.kind == "sum":
            offset = 0
            for c in ref.children:
                size = self.size(c)
                for leaf, occs in self.expand(c).items():
                    for occ in occs:
                        full = torch.full((n,), -1, dtype=torch.long)
                        full[offset : offset + size] = occ
                        out.setdefault(leaf, []).append(full)
                offset += size
            return out
        stride = n
        flat = torch.arange(n)
        for c in ref.children:
            size = self.size(c)
            stride //= size
            coord = (flat // stride) % size
            for leaf, occs in self.expand(c).items():
                for occ in occs:
                    out.setdefault(leaf, []).append(occ[coord])
        return out


def _prod(xs: tuple[int, ...] | list[int]) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _identity(kind: str) -> int:
    return 1 if kind == "prod" else 0


def _advance(kind: str, acc: int, size: int) -> int:
    return acc * size if kind == "prod" else acc + size


def _between(kind: str, a: int, b: int) -> int:
    return b // a if kind == "prod" else b - a


def _combine(kind: str, sizes: list[int]) -> int:
    return _prod(sizes) if kind == "prod" else sum(sizes)


def _boundaries(kind: str, sizes: list[int]) -> list[int]:
    acc = _identity(kind)
    out = []
    for s in sizes:
        acc = _advance(kind, acc, s)
        out.append(acc)
    return out


def _spans(kind: str, sizes: list[int]) -> list[tuple[int, int]]:
    acc = _identity(kind)
    out = []
    for s in sizes:
        nxt = _advance(kind, acc, s)
        out.append((acc, nxt))
        acc = nxt
    return out
