"""Unstructured and N:M sparsity: keep masks per weight, how to choose them, and how to keep them.

Structured pruning zeroes whole structures of a pruning group and ``erase`` removes them; the
unstructured and semi-structured (N:M) baselines instead zero single weights, which no erasure can
turn into a smaller dense model. What they leave behind is a :class:`WeightMasks`: parameter name
-> bool *keep* mask (True = the weight stays), stored by the passes in the pass context under ``WeightMasks`` so
later passes (recovery, EBFT) keep the pruned weights at zero.

- :func:`unstructured_mask` keeps all but the ``ratio`` lowest scores, per row or per matrix;
- :func:`nm_mask` zeroes exactly ``n`` of every ``m`` consecutive input columns of each row
  (2:4 is what sparse tensor cores run);
- :func:`register_mask_hooks` keeps masked weights at zero during training;
- :func:`masks_from_zeros` reads the masks back off a model whose pruned weights are zero.

Example:
    >>> import torch
    >>> scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    >>> nm_mask(scores, 2, 4).int().tolist()
    [[1, 0, 1, 0, 1, 0, 0, 1]]
    >>> unstructured_mask(scores, 0.25, per_row=True).int().tolist()
    [[1, 0, 1, 0, 1, 1, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from shear.errors import KernelError

__all__ = [
    "WeightMasks",
    "SparsityStats",
    "MaskHooks",
    "nm_mask",
    "unstructured_mask",
    "register_mask_hooks",
    "masks_from_zeros",
    "check_ratio",
    "check_nm",
    "check_mode",
    "select_mask",
    "store_masks",
]


def check_ratio(pass_name: str, ratio: float) -> None:
    """KernelError unless ``ratio`` is a number with ``0 < ratio < 1`` (a sparsity of 0 or 1 is a mistake,
    not a baseline; text such as ``"0.2"`` is refused, not converted)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise KernelError(f"{pass_name}: ratio must be in (0, 1), got {ratio!r}; give it as a number, e.g. ratio=0.2")


def check_nm(pass_name: str, n: int, m: int) -> None:
    """KernelError unless ``0 < n < m`` (N:M zeroes n of every m consecutive weights)."""
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise KernelError(f"{pass_name}: N:M sparsity needs integers 0 < n < m, got n={n}, m={m}")


def check_mode(pass_name: str, mode: str, allowed: tuple[str, ...] = ("unstructured", "nm")) -> None:
    """KernelError unless ``mode`` is one of ``allowed``."""
    if mode not in allowed:
        raise KernelError(f"{pass_name}: mode must be one of {', '.join(allowed)}; got {mode!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with exactly ``n`` zeros in every group of ``m`` consecutive columns of each row.

    ``scores`` is ``[rows, cols]`` (higher = more important) with ``cols`` divisible by ``m``; in
    each group the ``m - n`` highest scores are kept (ties go to the earlier column).
    """
    check_nm("nm_mask", n, m)
    if scores.dim() != 2 or scores.shape[1] % m:
        raise KernelError(
            f"N:M sparsity {n}:{m} needs a 2-D weight whose input width is a multiple of {m}, got shape "
            f"{tuple(scores.shape)}; use mode=unstructured for this layer or another m"
        )
    rows, cols = scores.shape
    groups = scores.detach().reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices  # ascending: the first n are pruned
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], False)
    return keep.reshape(rows, cols)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (along the last dim) of the ``k`` lowest scores; ties go to the earlier position."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def unstructured_mask(scores: torch.Tensor, ratio: float, per_row: bool = False) -> torch.Tensor:
    """Keep mask that drops exactly ``round(ratio * cols)`` per row, or ``round(ratio * numel)`` in all.

    ``per_row=True`` compares weights of one output row only (Wanda's default, which keeps every
    output alive); ``per_row=False`` compares all weights of the matrix (magnitude pruning's usual
    layer-wise threshold).
    """
    check_ratio("unstructured_mask", ratio)
    s = scores.detach()
    keep = torch.ones_like(s, dtype=torch.bool)
    if per_row and s.dim() >= 2:
        flat = s.reshape(s.shape[0], -1)
        k = round(ratio * flat.shape[1])
        keep.view(flat.shape).scatter_(1, _lowest(flat, k), False)
    else:
        k = round(ratio * s.numel())
        keep.view(-1)[_lowest(s.reshape(-1), k)] = False
    return keep


def select_mask(scores: torch.Tensor, mode: str, ratio: float, n: int, m: int, per_row: bool) -> torch.Tensor:
    """Keep mask from importance ``scores``: :func:`nm_mask` for ``mode="nm"``, else :func:`unstructured_mask`."""
    if mode == "nm":
        return nm_mask(scores, n, m)
    return unstructured_mask(scores, ratio, per_row)


@dataclass(frozen=True)
class SparsityStats:
    """Fraction of zeroed (masked) weights, per parameter and over all of them."""

    per_param: Mapping[str, float]
    """Parameter name -> fraction of its weights that the mask drops."""
    total: float
    """Masked weights / all weights under a mask."""

    @property
    def mean(self) -> float:
        return sum(self.per_param.values()) / len(self.per_param) if self.per_param else 0.0

    @property
    def min(self) -> float:
        return min(self.per_param.values(), default=0.0)

    @property
    def max(self) -> float:
        return max(self.per_param.values(), default=0.0)

    def as_dict(self) -> dict[str, float]:
        """``{"sparsity", "layer_mean", "layer_min", "layer_max", "layers"}`` for a PassResult."""
        return {
            "sparsity": self.total,
            "layer_mean": self.mean,
            "layer_min": self.min,
            "layer_max": self.max,
            "layers": float(len(self.per_param)),
        }


@dataclass(frozen=True)
class WeightMasks(Mapping[str, torch.Tensor]):
    """Parameter name -> bool keep mask (True keeps the weight), for unstructured / N:M sparsity.

    A read-only mapping (``masks[name]``, ``len``, iteration) whose ``masks`` attribute is the same
    table. Names are those of ``model.named_parameters()`` of the model the masks were made for
    (for a peft model: ``...q_proj.base_layer.weight``). Combine with ``|``.

    Example:
        >>> lin = torch.nn.Linear(4, 2)
        >>> masks = WeightMasks({"weight": torch.tensor([[True, False, True, False]] * 2)})
        >>> masks.apply(lin); int((lin.weight == 0).sum())
        4
        >>> masks.sparsity().total
        0.5
    """

    masks: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        table = {}
        for name, mask in self.masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise KernelError(f"WeightMasks[{name!r}] must be a bool tensor (True = keep), got {mask!r:.60}")
            table[name] = mask.detach()
        object.__setattr__(self, "masks", MappingProxyType(table))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __or__(self, other: Mapping[str, torch.Tensor]) -> WeightMasks:
        """Both tables; where a name is in both, a weight is kept only if both keep it."""
        table = dict(self.masks)
        for name, mask in other.items():
            table[name] = table[name] & mask if name in table else mask
        return WeightMasks(table)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters(remove_duplicate=False))
        missing = [n for n in self.masks if n not in params]
        if missing:
            raise KernelError(
                f"masks name parameters the model does not have: {missing[:4]}; were the masks made for "
                "another model (or before erase / peft wrapping)?"
            )
        for name, mask in self.masks.items():
            if tuple(mask.shape) != tuple(params[name].shape):
                raise KernelError(
                    f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter {tuple(params[name].shape)}"
                )
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked-out weight of ``model`` in place."""
        params = self._params(model)
        for name, mask in self.masks.items():
            p = params[name]
            p.mul_(mask.to(device=p.device, dtype=p.dtype))

    def sparsity(self) -> SparsityStats:
        """Fraction of dropped weights per parameter and in total."""
        per = {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items() if m.numel()}
        dropped = sum(int((~m).sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        return SparsityStats(MappingProxyType(per), dropped / total if total else 0.0)

    def holds(self, model: nn.Module) -> bool:
        """Whether every masked-out weight of ``model`` is exactly zero."""
        params = self._params(model)
        return all(not bool(params[n].detach()[~m.to(params[n].device)].any()) for n, m in self.masks.items())


class MaskHooks:
    """Handles of :func:`register_mask_hooks`; ``remove()`` takes them all off."""

    def __init__(self, handles: Iterable[Any]) -> None:
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> MaskHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_mask_hooks(
    model: nn.Module, masks: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
) -> MaskHooks:
    """Keep the masked-out weights of ``model`` at zero while it trains.

    Two mechanisms, both registered here:

    1. a **gradient hook** on every masked parameter multiplies its gradient by the mask, so
       the pruned weights get zero gradient (with SGD, and with Adam/AdamW started after pruning,
       whose moments then stay zero, they never move; weight decay of a zero weight is zero);
    2. when ``optimizer`` is given, a **post-step hook** re-applies the masks after every
       ``optimizer.step()``, which also covers optimizers with state from before pruning
       (momentum, Adam moments) and anything else that writes weights.

    The masks are applied once immediately. Returns a :class:`MaskHooks` (``.remove()``, or use it
    as a context manager).

    Example:
        >>> lin = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
        >>> keep = {"weight": torch.tensor([[True, False] * 2] * 2)}
        >>> with register_mask_hooks(lin, keep, opt):
        ...     lin(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> bool((lin.weight[:, 1::2] == 0).all())
        True
    """
    wm = masks if isinstance(masks, WeightMasks) else WeightMasks(dict(masks))
    params = wm._params(model)
    wm.apply(model)
    handles: list[Any] = []
    for name, mask in wm.items():
        p = params[name]
        m = mask.to(device=p.device)

        def grad_hook(grad: torch.Tensor, m: torch.Tensor = m) -> torch.Tensor:
            return grad * m.to(grad.dtype)

        if p.requires_grad:
            handles.append(p.register_hook(grad_hook))
    if optimizer is not None:

        def post_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            wm.apply(model)

        handles.append(optimizer.register_step_post_hook(post_step))
    return MaskHooks(handles)


def masks_from_zeros(model: nn.Module, params: Iterable[str]) -> WeightMasks:
    """Keep masks read off ``model``: a weight of one of ``params`` is kept iff it is not exactly zero."""
    table = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name in params:
        if name not in table:
            raise KernelError(f"masks_from_zeros: the model has no parameter {name!r}")
        out[name] = table[name].detach().ne(0)
    return WeightMasks(out)


def store_masks(analyses: MutableMapping[Any, Any], masks: WeightMasks) -> WeightMasks:
    """Put ``masks`` into ``analyses[WeightMasks]`` (a pass context's ``ctx.analyses``), combined
    (``|``) with masks an earlier pass left there."""
    before = analyses.get(WeightMasks)
    merged = before | masks if isinstance(before, WeightMasks) else masks
    analyses[WeightMasks] = merged
    return merged
