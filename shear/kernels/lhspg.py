"""LHSPG's weight arithmetic: LoRA-aware views of structures, decay with half-space projection, merges.

A structure of a pruning group is *removable* when its primary slices (producer rows, biases,
lora_B rows) are exactly zero. Under LoRA the function of a producer row ``r`` of a base weight
``W`` is the effective row ``W[r] + s * B[r] @ A``; :class:`StructureViews` reads and writes those
effective primary slices for a set of structures.

One LHSPG step on the structures moving to the redundant set during a period of ``Tp`` steps
(after the optimizer updated A and B), at period step ``t``:

    x_g  <- (1 - lambda_t) * (x_g + s * (B A)_g),   lambda_t = 1 / (Tp - t),   B_g <- 0

so the LoRA update is first merged into the structure (its knowledge reaches the loss for one more
step) and the structure then decays linearly: ``prod (1 - lambda)`` telescopes to
``(Tp - t - 1) / Tp``, and the last step (``lambda = 1``) makes it exactly zero. Half-space
projection: when ``<x_new, x_g> < eps * ||x_g||^2`` (the update turned the structure around), it is
zeroed at once and stays zero. Structures already zero are held at zero (``B_g <- 0``, their Adam
moments cleared) so LoRA cannot rebuild them. Important structures are never touched between
merges.

Under FSDP2 the weights are ``DTensor`` shards and a structure's rows can span ranks: every read
gathers the weight whole and every write puts each rank's block back (:mod:`shear.model.dtensor`);
:meth:`StructureViews.bind` points the views at the sharded model the training loop runs.

Example:
    >>> views = StructureViews(model, graph.prunable_groups, graph.composites)       # doctest: +SKIP
    >>> views.decay({gid: torch.tensor([3, 7])}, lam=0.25, eps=0.0)                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import KernelError
from shear.graph.groups import PruningGroup
from shear.graph.ir import LoraComposite
from shear.model.dtensor import gather, writable
from shear.model.tensors import TensorTable

__all__ = ["StructureViews", "LoraLink"]


@dataclass(frozen=True)
class LoraLink:
    """The adapter of a LoRA'd base weight: effective weight ``W + scaling * B @ A``."""

    a: str
    b: str
    scaling: float


@dataclass(frozen=True)
class _View:
    """One primary member of a group: tensor, dim, index table, and its LoRA link if any."""

    tensor: str
    dim: int
    positions: torch.Tensor
    lora: LoraLink | None


class StructureViews:
    """Effective primary slices of the prunable groups of a (LoRA) model, by structure."""

    def __init__(
        self, model: nn.Module, groups: Iterable[PruningGroup], composites: Iterable[LoraComposite] = ()
    ) -> None:
        self.table = TensorTable(model)
        links: dict[str, LoraLink] = {}
        b_names: set[str] = set()
        for c in composites:
            if len(c.adapters) != 1:
                raise KernelError(
                    f"{c.module}: lhspg needs one active LoRA adapter per layer, found {list(c.adapters)}; "
                    "merge or delete the others first"
                )
            base = self.table.resolve(f"{c.base}.weight")
            a, b = self.table.resolve(c.lora_a[0]), self.table.resolve(c.lora_b[0])
            if self.table.tensors[base].dim() != 2:
                raise KernelError(f"{c.module}: lhspg supports LoRA on Linear layers; this base weight is not 2-D")
            links[base] = LoraLink(a, b, float(c.scaling[0]))
            b_names.add(b)
        self.links = links
        self._flat_cache: dict[tuple[object, ...], torch.Tensor] = {}
        self.groups: dict[int, PruningGroup] = {g.id: g for g in groups if g.prunable}
        self._model = model
        self.views: dict[int, list[_View]] = {}
        self.b_rows: dict[int, list[tuple[str, torch.Tensor]]] = {}
        for g in self.groups.values():
            views, brows = [], []
            for m in g.primary:
                name = self.table.resolve(m.param)
                if name in b_names:
                    if m.dim != 0:
                        raise KernelError(f"group {g.name}: lora_B member {name} on dim {m.dim}, expected 0")
                    brows.append((name, m.positions))
                    continue
                link = links.get(name) if m.dim == 0 else None
                views.append(_View(name, m.dim, m.positions, link))
            self.views[g.id] = views
            # a LoRA'd view zeroes its own lora_B rows; keep only the B members no view covers
            linked = [(v.lora.b, v.positions) for v in views if v.lora is not None]
            self.b_rows[g.id] = [
                (n, pos) for n, pos in brows
                if not any(n == b and pos.shape == p.shape and torch.equal(pos, p) for b, p in linked)
            ]

    def bind(self, model: nn.Module) -> None:
        """Read and write the tensors of ``model`` from now on: a model with the same parameter names
        (the FSDP2-sharded copy the training loop runs, or the original again)."""
        if model is self._model:
            return
        table = TensorTable(model)
        missing = [n for n in self.table.tensors if n not in table.tensors]
        if missing:
            raise KernelError(
                f"lhspg: the model to bind lacks {len(missing)} tensors of the traced one (e.g. {missing[0]!r}); "
                "bind a model with the same parameter names"
            )
        self.table, self._model = table, model
        self._flat_cache.clear()

    # -- reading ----------------------------------------------------------------------------------

    def _flat(self, positions: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``positions[idx].flatten()`` on ``device``, cached: the index sets of a period are reused by
        every step, so after the first step no index tensor crosses to the weights' device again."""
        if idx.device.type != "cpu":
            return positions.to(idx.device)[idx].flatten().to(device)
        key = (id(positions), device, idx.dtype, idx.numel(), idx.numpy().tobytes())
        flat = self._flat_cache.get(key)
        if flat is None:
            if len(self._flat_cache) >= 1024:
                self._flat_cache.clear()
            flat = self._flat_cache[key] = positions[idx].flatten().to(device)
        return flat

    def _base(self, v: _View, idx: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` fp32 slices of structures ``idx`` of the tensor of ``v`` (no LoRA)."""
        t = gather(self.table.tensors[v.tensor]).detach()
        return t.index_select(v.dim, self._flat(v.positions, idx, t.device)).movedim(v.dim, 0).float()

    def _with_lora(self, v: _View, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x`` (from :meth:`_base`) plus ``s * (B A)`` on the LoRA rows of ``v``."""
        if v.lora is None:
            return x
        a = gather(self.table.tensors[v.lora.a]).detach().float()
        b = gather(self.table.tensors[v.lora.b]).detach()
        rows = b.index_select(0, self._flat(v.positions, idx, b.device)).float()
        return torch.addmm(x, rows, a, alpha=v.lora.scaling)  # x: [rows, in] (LoRA views are dim 0)

    def _slice(self, v: _View, idx: torch.Tensor, *, with_lora: bool = True) -> torch.Tensor:
        """``[n, numel]`` slices of structures ``idx`` for view ``v``: W (+ s * B @ A on LoRA rows)."""
        x = self._base(v, idx)
        if with_lora:
            x = self._with_lora(v, idx, x)
        return x.reshape(len(idx), -1)

    def effective(self, gid: int, idx: torch.Tensor) -> torch.Tensor:
        """``[n, numel]``: the concatenated effective primary slices of structures ``idx`` of ``gid``."""
        return torch.cat([self._slice(v, idx) for v in self.views[gid]], dim=1)

    def norms(self, gid: int) -> torch.Tensor:
        """``[size]`` L2 norms of the effective primary slices of every structure of ``gid``."""
        idx = torch.arange(self.groups[gid].size)
        return self.effective(gid, idx).norm(dim=1)

    # -- writing ----------------------------------------------------------------------------------

    def _write(self, v: _View, idx: torch.Tensor, values: torch.Tensor) -> None:
        t = self.table.tensors[v.tensor]
        flat = self._flat(v.positions, idx, t.device)
        shape = list(t.shape)
        shape[v.dim] = flat.numel()
        moved = [shape[v.dim]] + [s for d, s in enumerate(shape) if d != v.dim]
        with torch.no_grad(), writable(t) as whole:
            whole.index_copy_(v.dim, flat, values.reshape(moved).movedim(0, v.dim).to(t.dtype))

    def _zero_b(self, gid: int, idx: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
        for v in self.views[gid]:
            if v.lora is not None:
                self._zero_rows(v.lora.b, v.positions, idx, optimizer)
        for name, positions in self.b_rows[gid]:
            self._zero_rows(name, positions, idx, optimizer)

    def _zero_rows(
        self, name: str, positions: torch.Tensor, idx: torch.Tensor, optimizer: torch.optim.Optimizer | None
    ) -> None:
        t = self.table.tensors[name]
        rows = self._flat(positions, idx, t.device)
        with torch.no_grad(), writable(t) as whole:
            whole.index_fill_(0, rows, 0)
        if optimizer is not None:
            for value in optimizer.state.get(t, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == t.shape:
                    with torch.no_grad(), writable(value) as whole:
                        whole.index_fill_(0, rows, 0)

    @torch.no_grad()
    def decay(
        self,
        idx_by_group: Mapping[int, torch.Tensor],
        lam: float,
        *,
        eps: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        held: dict[int, torch.Tensor] | None = None,
    ) -> dict[int, torch.Tensor]:
        """One LHSPG step on decaying structures; returns, per group, the ones the projection zeroed.

        The half-space test compares the new slice with the base slice ``W_g``, which is the
        structure's effective value before the step (``B_g`` was reset after the last one).

        With ``held`` (group id -> bool mask over ``idx_by_group[gid]`` on the weights' device,
        created when missing and updated in place) nothing is read back to the host: structures the
        projection zeroed in an earlier step are held at zero, newly projected ones join the mask,
        and the returned dict is empty. This is how the training hook calls it, once per step.

        The work is per group, not per view: the views' slices are concatenated once, so the
        half-space test, the decay and the projection are a handful of kernels per group whatever
        its number of views (each launch costs ~10 us of host time, which is what a LoRA step on a
        small model is made of on a GPU).
        """
        if not 0.0 <= lam <= 1.0:
            raise KernelError(f"decay factor lambda must be in [0, 1], got {lam}")
        projected: dict[int, torch.Tensor] = {}
        keep = 1.0 - lam
        for gid, idx in idx_by_group.items():
            if idx.numel() == 0:
                continue
            views, n = self.views[gid], len(idx)
            olds = [self._base(v, idx) for v in views]
            curs = [self._with_lora(v, idx, o).reshape(n, -1) for v, o in zip(views, olds)]
            old = torch.cat([o.reshape(n, -1) for o in olds], dim=1) if len(views) > 1 else olds[0].reshape(n, -1)
            cur = torch.cat(curs, dim=1) if len(views) > 1 else curs[0]
            norm2 = torch.linalg.vecdot(old, old)
            if lam == 1.0:
                flip = torch.ones(n, dtype=torch.bool, device=cur.device)
            elif eps == 0.0:  # <(1 - lam) x, x_g> < 0, and 1 - lam > 0
                flip = (torch.linalg.vecdot(cur, old) < 0) & (norm2 > 0)
            else:
                flip = (torch.linalg.vecdot(cur, old).mul_(keep) < norm2 * eps) & (norm2 > 0)
            if held is not None:
                before = held.get(gid)
                if before is None:
                    before = held[gid] = torch.zeros(n, dtype=torch.bool, device=cur.device)
                if lam < 1.0:
                    before |= flip
                    flip = before
            new = cur.mul_(keep).masked_fill_(flip.unsqueeze(1), 0)  # cur is a fresh copy; old is no longer read
            start = 0
            for v, c in zip(views, curs):
                width = c.shape[1]
                self._write(v, idx, new[:, start:start + width])
                start += width
            self._zero_b(gid, idx, optimizer)
            if held is None and lam < 1.0 and bool(flip.any()):
                projected[gid] = idx[flip.cpu()]
        return projected

    @torch.no_grad()
    def hold_zero(self, idx_by_group: Mapping[int, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep structures at exactly zero: zero their primary slices and lora_B rows (and moments)."""
        for gid, idx in idx_by_group.items():
            if idx.numel() == 0:
                continue
            for v in self.views[gid]:
                t = self.table.tensors[v.tensor]
                with torch.no_grad(), writable(t) as whole:
                    whole.index_fill_(v.dim, self._flat(v.positions, idx, t.device), 0)
            self._zero_b(gid, idx, optimizer)

    def is_zero(self, gid: int) -> torch.Tensor:
        """Bool ``[size]``: structures whose effective primary slices are exactly zero."""
        idx = torch.arange(self.groups[gid].size)
        return ~(self.effective(gid, idx) != 0).any(dim=1)
