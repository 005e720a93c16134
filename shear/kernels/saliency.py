"""Saliency of minimally removable structures (LoRAShear §3.3): pure functions over a model's weights.

Every structure ``i`` of a pruning group owns slices of several tensors (producer rows, consumer
columns, norm weights, ...). A criterion reduces those slices to one number per structure:

``magnitude``
    ``‖W_g‖₂`` over all slices of the *effective* weight ``W + Σ s·B A`` (LoRA folded in).
``cosine``
    ``1 + cos(W_g, (BA)_g)`` over the slices of LoRA-wrapped base weights, in ``[0, 2]``. LoRA's
    update ``x ← x + s·BA`` *grows* a structure whose ``BA`` points along it and *shrinks* one whose
    ``BA`` points against it; the paper calls the latter redundant, so a low score means
    "training is pushing this structure towards zero" (the ``+1`` is the reference
    implementation's shift, only-train-once ``importance_score_by_cosine_similarity_lora``). With
    ``B = 0`` (peft's default init) every structure scores exactly 1: the criterion carries no
    information until LoRA has trained, which is why LHSPG recomputes saliency every period.
``taylor1`` / ``taylor2``
    ``|⟨W_g, G_g⟩|`` and ``|⟨W_g, G_g⟩| + ½ Σ (G ⊙ W)²_g`` (the second-order term with the Fisher
    diagonal ``H ≈ G²``), where ``G`` is the mean gradient of the next-token loss on calibration
    windows w.r.t. the effective weight (``gradient="loss"``) or, as in the paper, the LoRA product
    ``s·BA`` used as the gradient proxy (``gradient="lora"``).
``activation``
    Wanda-style ``‖W_g ⊙ ‖X‖‖₂``: every weight element of a ``Linear`` (or transformers ``Conv1D``)
    is multiplied by the L2 norm over calibration tokens of the input feature it reads. The norm is
    that of the *owning* layer's input, for row slices (producers) and column slices (consumers)
    alike, which is Wanda's per-element score summed per structure. Tensors that are not the weight
    of such a layer (norm weights, biases, embeddings that are not tied to an ``lm_head``)
    contribute nothing to this criterion.

Each criterion is divided by its L2 norm over all structures of all scored groups, so criteria
are comparable, and the combined score is the weighted sum. LHSPG calls :func:`compute_saliency`
again at every period on the current weights.

Example:
    >>> import torch
    >>> from shear.graph.groups import Member, PruningGroup, Role
    >>> lin = torch.nn.Linear(2, 3, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]]))
    >>> g = PruningGroup(0, "out", (Member("weight", 0, Role.PRIMARY, torch.arange(3).view(3, 1)),), 3)
    >>> s = compute_saliency(lin, [g], weights="magnitude=1")
    >>> s.by_group[0].argsort().tolist()
    [1, 2, 0]
    >>> [(g, i, round(v, 4)) for g, i, v in s.lowest(1)]
    [(0, 1, 0.2673)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.errors import DataError, KernelError
from shear.graph.groups import Member, PruningGroup
from shear.graph.ir import LoraComposite
from shear.kernels.saliency_signals import (
    add_rowsum,
    input_norms,
    loss_gradient_rowsums,
    loss_gradients,
    row_blocks,
    rowsum,
)
from shear.model.tensors import TensorTable

__all__ = [
    "CRITERIA",
    "SaliencyScores",
    "parse_weights",
    "compute_saliency",
    "taylor_importance",
    "loss_gradients",
    "loss_gradient_rowsums",
    "input_norms",
    "lora_deltas",
    "structure_reduce",
]

CRITERIA: tuple[str, ...] = ("magnitude", "cosine", "taylor1", "taylor2", "activation")
"""Criterion names, in the order they are reported."""

WeightsSpec = str | Mapping[str, float] | Sequence[str]


def parse_weights(spec: WeightsSpec) -> dict[str, float]:
    """``{criterion: weight}`` from ``"magnitude=1,cosine=0.5"``, a mapping, or a list of ``name=w`` items.

    Unknown criteria and non-numeric weights raise :class:`KernelError`; missing ones weigh 0.

    Example:
        >>> parse_weights("magnitude=1, taylor2=0.5")
        {'magnitude': 1.0, 'cosine': 0.0, 'taylor1': 0.0, 'taylor2': 0.5, 'activation': 0.0}
        >>> parse_weights(["magnitude=1", "cosine=1"])["cosine"]
        1.0
    """
    items: dict[str, Any]
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        parts = [spec] if isinstance(spec, str) else list(spec)
        items = {}
        for part in parts:
            for item in str(part).split(","):
                item = item.strip()
                if not item:
                    continue
                name, eq, value = item.partition("=")
                if not eq:
                    raise KernelError(f"saliency weights: expected 'criterion=weight', got {item!r}")
                items[name.strip()] = value.strip()
    out = dict.fromkeys(CRITERIA, 0.0)
    for name, value in items.items():
        if name not in CRITERIA:
            raise KernelError(f"saliency weights: unknown criterion {name!r}; choose from {', '.join(CRITERIA)}")
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise KernelError(f"saliency weights: weight of {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(w) or w < 0:
            raise KernelError(f"saliency weights: weight of {name!r} must be finite and >= 0, got {w}")
        out[name] = w
    if not any(out.values()):
        raise KernelError(f"saliency weights: all weights are zero in {spec!r}; give at least one criterion a weight")
    return out


@dataclass(frozen=True)
class SaliencyScores:
    """Per-structure saliency of every scored pruning group (higher = more important)."""

    by_group: dict[int, torch.Tensor]
    """Pruning group id -> float ``[size]``: the weighted sum of the normalised criteria."""
    criteria: dict[str, dict[int, torch.Tensor]]
    """Criterion -> group id -> raw (un-normalised) scores; only criteria with a non-zero weight."""
    weights: dict[str, float]
    """The weight of every criterion (0 for those not computed)."""
    gradient: str = "none"
    """Where the Taylor gradient came from: ``loss``, ``lora`` or ``none`` (no Taylor criterion)."""
    notes: tuple[str, ...] = field(default=())
    """Things worth knowing about the scores (groups without LoRA for ``cosine``, ...)."""

    def __post_init__(self) -> None:
        for name, table in self.criteria.items():
            if name not in CRITERIA:
                raise KernelError(f"SaliencyScores: unknown criterion {name!r}")
            if table.keys() != self.by_group.keys():
                raise KernelError(f"SaliencyScores: criterion {name!r} scores other groups than by_group")
            for gid, v in table.items():
                if v.shape != self.by_group[gid].shape:
                    raise KernelError(f"SaliencyScores: criterion {name!r} of group {gid} has shape {tuple(v.shape)}")

    def flat(self) -> list[tuple[int, int, float]]:
        """Every ``(group id, structure index, score)``, lowest score first (ties by group, index)."""
        out = [(gid, i, float(s)) for gid, v in self.by_group.items() for i, s in enumerate(v.tolist())]
        out.sort(key=lambda t: (t[2], t[0], t[1]))
        return out

    def lowest(self, k: int, groups: Iterable[int] | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` lowest-scoring ``(group id, index, score)`` overall, or among ``groups`` (ids)."""
        keep = None if groups is None else set(groups)
        rows = self.flat() if keep is None else [t for t in self.flat() if t[0] in keep]
        return rows[: max(k, 0)]

    def lowest_in(self, group: int, k: int) -> torch.Tensor:
        """Sorted indices of the ``k`` lowest-scoring structures of one group (stable on ties)."""
        v = self.by_group[group]
        k = max(0, min(k, v.numel()))
        return torch.sort(torch.argsort(v, stable=True)[:k]).values


# -- tensors ------------------------------------------------------------------------------------


def lora_deltas(table: TensorTable, composites: Iterable[LoraComposite]) -> dict[str, list[tuple[str, str, float]]]:
    """Canonical base-weight name -> ``[(lora_A, lora_B, scaling), ...]`` (canonical names) per adapter."""
    out: dict[str, list[tuple[str, str, float]]] = {}
    for c in composites:
        base = table.resolve(f"{c.base}.weight")
        for a, b, s in zip(c.lora_a, c.lora_b, c.scaling, strict=True):
            out.setdefault(base, []).append((table.resolve(a), table.resolve(b), float(s)))
    return out


def _delta(
    table: TensorTable, adapters: list[tuple[str, str, float]], shape: torch.Size, rows: slice = slice(None)
) -> torch.Tensor | None:
    """``Σ s·B A`` in the base weight's shape (its ``rows`` along dim 0), or None when the adapters
    are not plain linear ones."""
    total: torch.Tensor | None = None
    for a, b, s in adapters:
        A, B = table.tensors[a].detach(), table.tensors[b].detach()
        if A.dim() != 2 or B.dim() != 2 or (B.shape[0], A.shape[1]) != tuple(shape):
            return None
        d = s * (B[rows].float() @ A.float())
        total = d if total is None else total + d
    return total


def structure_reduce(rows: torch.Tensor, member: Member) -> torch.Tensor:
    """``[size]``: a per-index vector along ``member.dim`` summed over each structure's indices."""
    return rows[member.positions.to(rows.device)].sum(dim=1)


def _effective(
    table: TensorTable, lora: Mapping[str, list[tuple[str, str, float]]], canon: str, rows: slice = slice(None)
) -> torch.Tensor:
    """``W + Σ s·B A`` in fp32, its ``rows`` along dim 0 (``W`` alone when the adapters do not fit its shape)."""
    t = table.tensors[canon].detach()
    W = t[rows].float()
    D = _delta(table, lora[canon], t.shape, rows) if canon in lora else None
    return W + D if D is not None else W


def _scored_members(table: TensorTable, group: PruningGroup, skip: set[str]) -> list[tuple[str, Member]]:
    """(canonical tensor name, member) of a group, without buffers and LoRA A/B factors."""
    out = []
    for m in group.members:
        if m.is_buffer:
            continue
        canon = table.resolve(m.param)
        if canon in skip or not table.is_param[canon]:
            continue
        out.append((canon, m))
    return out


def compute_saliency(
    model: nn.Module,
    groups: Iterable[PruningGroup],
    *,
    weights: WeightsSpec = "magnitude=1",
    calibration_ids: torch.Tensor | None = None,
    composites: Iterable[LoraComposite] = (),
    gradient: str = "auto",
    batch_size: int = 4,
    only_prunable: bool = True,
) -> SaliencyScores:
    """Score every structure of ``groups`` (the prunable ones unless ``only_prunable=False``).

    Args:
        model: the model whose current weights are scored (not modified).
        groups: pruning groups, e.g. ``graph.pruning_groups``.
        weights: criterion weights (:func:`parse_weights`); only criteria with weight > 0 are computed.
        calibration_ids: ``[n, seq_len]`` token ids (``TextData.calibration``); needed by
            ``activation`` and by the Taylor criteria with ``gradient="loss"``.
        composites: the graph's LoRA composites (``graph.composites``): LoRA is folded into the
            effective weight and gives ``cosine`` and the ``lora`` gradient proxy.
        gradient: ``"loss"`` (real gradient on the calibration data), ``"lora"`` (``s·BA`` as proxy,
            the paper's choice), or ``"auto"`` (``loss`` when calibration ids are given, else ``lora``).
        batch_size: calibration windows per forward pass.
        only_prunable: skip groups whose ``prunable`` is False.

    Raises:
        DataError: a data-needing criterion has weight > 0 and no calibration ids were given, or
            the Taylor criteria have neither data nor LoRA to take a gradient from.
    """
    w = parse_weights(weights)
    active = [c for c in CRITERIA if w[c] > 0]
    scored = [g for g in groups if g.prunable or not only_prunable]
    table = TensorTable(model)
    lora = lora_deltas(table, composites)
    lora_factors = {n for adapters in lora.values() for a, b, _ in adapters for n in (a, b)}
    mode = _gradient_mode(active, gradient, calibration_ids is not None, bool(lora))
    members = {g.id: _scored_members(table, g, lora_factors) for g in scored}
    needed: dict[str, set[int]] = {}
    for ms in members.values():
        for canon, m in ms:
            needed.setdefault(canon, set()).add(m.dim)
    grads: dict[str, torch.Tensor] = {}
    xnorms: dict[str, tuple[torch.Tensor, int]] = {}
    streamed: dict[tuple[str, int], torch.Tensor] | None = None
    if mode == "loss" and calibration_ids is not None:
        low = any(table.tensors[c].dtype in (torch.float16, torch.bfloat16) for c in needed)
        if low and "taylor2" not in active:  # 16-bit weights: no gradient kept beyond its own backward step
            streamed = loss_gradient_rowsums(
                model, needed, calibration_ids, effective=lambda c, r: _effective(table, lora, c, r), batch_size=batch_size
            )
        else:
            grads = loss_gradients(model, needed, calibration_ids, batch_size=batch_size)
    if "activation" in active and calibration_ids is not None:
        xnorms = input_norms(model, needed, calibration_ids, batch_size=batch_size)
    notes: list[str] = []
    rows = _tensor_rowsums(table, lora, needed, active, mode, grads, xnorms, streamed, notes)
    raw = _criteria_by_group(scored, members, rows, active, notes)
    by_group = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in scored}
    for c in active:
        total = math.sqrt(sum(float(v.pow(2).sum()) for v in raw[c].values()))
        for gid, v in raw[c].items():
            by_group[gid] += w[c] * (v / total if total > 0 else v)
    return SaliencyScores(
        by_group={k: v.float() for k, v in by_group.items()},
        criteria={c: {k: v.float() for k, v in raw[c].items()} for c in active},
        weights=w,
        gradient=mode,
        notes=tuple(notes),
    )


def _gradient_mode(active: list[str], gradient: str, has_data: bool, has_lora: bool) -> str:
    """Where the Taylor criteria take their gradient (``"loss"``, ``"lora"``, or ``"none"`` when no
    Taylor criterion is active); a :class:`DataError` when a criterion lacks what it needs."""
    if gradient not in ("auto", "loss", "lora"):
        raise KernelError(f"saliency: gradient must be 'auto', 'loss' or 'lora', got {gradient!r}")
    mode = "none"
    if "taylor1" in active or "taylor2" in active:
        mode = gradient if gradient != "auto" else ("loss" if has_data else "lora")
        if mode == "loss" and not has_data:
            raise DataError(
                "saliency: taylor1/taylor2 with gradient='loss' need calibration data: pass calibration_ids "
                "(shear.compile(..., data=TextData...)), use gradient='lora' on a LoRA model, or set their weight to 0"
            )
        if mode == "lora" and not has_lora:
            raise DataError(
                "saliency: taylor1/taylor2 need a gradient: the model has no LoRA adapters for the 'lora' proxy "
                "and no calibration data was given; pass data (shear.compile(..., data=TextData...)) or set their weight to 0"
            )
    if "activation" in active and not has_data:
        raise DataError(
            "saliency: the activation criterion needs calibration data for input norms; pass "
            "shear.compile(..., data=TextData...) (or calibration_ids=...) or set its weight to 0"
        )
    return mode


def _tensor_rowsums(
    table: TensorTable,
    lora: dict[str, Any],
    needed: dict[str, set[int]],
    active: list[str],
    mode: str,
    grads: dict[str, torch.Tensor],
    xnorms: dict[str, tuple[torch.Tensor, int]],
    streamed: dict[tuple[str, int], torch.Tensor] | None,
    notes: list[str],
) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """Per (tensor, dim): the per-index sums of each criterion's per-element terms (CPU), read in
    blocks of rows of the effective weight ``W + s B A``; ``grads`` are consumed."""
    taylor = "taylor1" in active or "taylor2" in active
    rows: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for canon, dims in needed.items():
            t = table.tensors[canon].detach()
            fits = canon in lora and _delta(table, lora[canon], t.shape, slice(0, 0)) is not None
            if canon in lora and not fits:
                notes.append(f"{canon}: LoRA factors do not match the weight's shape; LoRA ignored for it")
            grad = grads.pop(canon, None) if mode == "loss" else None
            sums: dict[tuple[int, str], torch.Tensor] = {}
            for blk in row_blocks(t.shape):  # every criterion is a sum of per-element terms
                W = t[blk].float()
                D = _delta(table, lora[canon], t.shape, blk) if fits else None
                E = W + D if D is not None else W
                G = grad[blk] if grad is not None else (D if mode == "lora" else None)
                for dim in dims:
                    red: dict[str, torch.Tensor] = {}
                    if "magnitude" in active:
                        red["e2"] = E * E
                    if "cosine" in active and D is not None:
                        red["ww"], red["dd"], red["wd"] = W * W, D * D, W * D
                    if taylor and G is not None:
                        p = E * G.to(E.device, torch.float32)
                        red["eg"], red["eg2"] = p, p * p
                    if "activation" in active and canon in xnorms:
                        norm, in_dim = xnorms[canon]
                        norm = norm.to(E.device)[blk] if in_dim == 0 else norm.to(E.device)
                        shape = [1] * E.dim()
                        shape[in_dim] = -1
                        a = E * norm.view(shape)
                        red["act"] = a * a
                    for key, v in red.items():
                        add_rowsum(sums, (dim, key), v, dim, blk, t.shape[dim])
                    del red
                del W, D, E, G
            del grad
            for dim in dims:
                found = {key: v.cpu() for (d, key), v in sums.items() if d == dim}
                if streamed is not None and (canon, dim) in streamed:
                    found["eg"] = streamed[(canon, dim)].cpu()
                rows[(canon, dim)] = found
    return rows


def _criteria_by_group(
    scored: list[PruningGroup],
    members: dict[int, Any],
    rows: dict[tuple[str, int], dict[str, torch.Tensor]],
    active: list[str],
    notes: list[str],
) -> dict[str, dict[int, torch.Tensor]]:
    """Each active criterion's raw (unnormalised) score per structure of each group, from the row sums."""
    raw: dict[str, dict[int, torch.Tensor]] = {c: {} for c in active}
    no_lora: list[str] = []
    for g in scored:
        acc: dict[str, torch.Tensor] = {}
        for canon, m in members[g.id]:
            for key, v in rows[(canon, m.dim)].items():
                s = structure_reduce(v, m)
                acc[key] = acc[key] + s if key in acc else s
        zero = torch.zeros(g.size, dtype=torch.float64)
        if "magnitude" in active:
            raw["magnitude"][g.id] = acc.get("e2", zero).sqrt()
        if "cosine" in active:
            if "wd" not in acc:
                no_lora.append(g.name)
            denom = acc.get("ww", zero).sqrt() * acc.get("dd", zero).sqrt()
            cos = torch.where(denom > 0, acc.get("wd", zero) / denom.clamp_min(1e-300), zero)
            raw["cosine"][g.id] = 1.0 + cos.clamp(-1.0, 1.0)
        if "taylor1" in active:
            raw["taylor1"][g.id] = acc.get("eg", zero).abs()
        if "taylor2" in active:
            raw["taylor2"][g.id] = acc.get("eg", zero).abs() + 0.5 * acc.get("eg2", zero)
        if "activation" in active:
            raw["activation"][g.id] = acc.get("act", zero).sqrt()
    if no_lora:
        notes.append(f"cosine: {len(no_lora)} groups have no LoRA slices and score 1 (e.g. {no_lora[0]})")
    return raw


def taylor_importance(
    model: nn.Module,
    groups: Iterable[PruningGroup],
    calibration_ids: torch.Tensor,
    *,
    composites: Iterable[LoraComposite] = (),
    aggregate: str = "sum",
    batch_size: int = 4,
) -> dict[int, torch.Tensor]:
    """LLM-Pruner's element-wise first-order group importance: per member ``Σ |W ⊙ G|`` over its slice.

    ``W`` is the effective weight (LoRA folded in), ``G`` the mean loss gradient on
    ``calibration_ids``; the per-member vectors of a group are combined by ``aggregate``
    (``sum``, ``mean`` or ``max``). Only prunable groups are scored.

    Example:
        >>> scores = taylor_importance(model, graph.pruning_groups, data.calibration(8, 64))  # doctest: +SKIP
    """
    if aggregate not in ("sum", "mean", "max"):
        raise KernelError(f"taylor: aggregate must be 'sum', 'mean' or 'max', got {aggregate!r}")
    scored = [g for g in groups if g.prunable]
    table = TensorTable(model)
    lora = lora_deltas(table, composites)
    lora_factors = {n for adapters in lora.values() for a, b, _ in adapters for n in (a, b)}
    members = {g.id: _scored_members(table, g, lora_factors) for g in scored}
    names = {canon for ms in members.values() for canon, _ in ms}
    grads = loss_gradients(model, names, calibration_ids, batch_size=batch_size)
    rows: dict[tuple[str, int], torch.Tensor] = {}
    with torch.no_grad():
        for canon in names:
            W = table.tensors[canon].detach().float()
            D = _delta(table, lora[canon], W.shape) if canon in lora else None
            E = W + D if D is not None else W
            p = (E * grads.pop(canon).to(E.device, torch.float32)).abs()
            for ms in members.values():
                for c, m in ms:
                    if c == canon and (canon, m.dim) not in rows:
                        rows[(canon, m.dim)] = rowsum(p, m.dim).cpu()
    out: dict[int, torch.Tensor] = {}
    for g in scored:
        per = [structure_reduce(rows[(canon, m.dim)], m) for canon, m in members[g.id]]
        if not per:
            out[g.id] = torch.zeros(g.size)
            continue
        stacked = torch.stack(per)
        agg = stacked.sum(0) if aggregate == "sum" else stacked.mean(0) if aggregate == "mean" else stacked.max(0).values
        out[g.id] = agg.float()
    return out
