"""AdamW, the learning-rate schedule, and resetting optimizer state after weight edits.

The schedule is a ``LambdaLR`` over a small picklable :class:`Schedule` (linear warmup, then
constant, linear or cosine decay to 0), so its state checkpoints as plain numbers.
:func:`reset_optimizer_state` is for hooks that edit trained weights (LHSPG zeroes LoRA B rows and
re-initialises adapters): it clears AdamW's moments for whole tensors or for some rows of them.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3, 2))
    >>> opt = build_optimizer([p], lr=0.1, weight_decay=0.0)
    >>> sched = build_scheduler(opt, "linear", warmup_steps=2, total_steps=10)
    >>> [round(Schedule("linear", 2, 10)(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    >>> p.sum().backward(); opt.step()
    >>> reset_optimizer_state(opt, [p], rows=[0])
    >>> opt.state[p]["exp_avg"][0].abs().sum().item()
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from shear.model.dtensor import writable

__all__ = ["Schedule", "build_optimizer", "build_scheduler", "reset_optimizer_state"]


class Schedule:
    """LR multiplier at a step: linear warmup to 1, then ``constant`` / ``linear`` / ``cosine`` to 0."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params``: fused (one kernel per step) when every param is a plain CUDA tensor,
    else one tensor at a time.

    The implementation depends on the params' device alone, so a resumed run takes the same kernels
    as the run it continues. Fused matters on a GPU: a LoRA model has hundreds of small adapter
    tensors, and a per-tensor AdamW spends ~10 kernel launches on each of them every step.
    """
    params = list(params)
    fused = bool(params) and all(p.is_cuda and type(p) in (torch.Tensor, nn.Parameter) for p in params)
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step ``LambdaLR`` following :class:`Schedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(kind, warmup_steps, total_steps))


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor] | None = None,
    *,
    rows: Sequence[int] | torch.Tensor | None = None,
) -> None:
    """Forget AdamW's moments: of all params (``params=None``), of some, or of some rows of them.

    Without ``rows`` a param's whole state is dropped (it restarts like a new param, step count
    included). With ``rows`` only those rows (dim 0) of ``exp_avg``/``exp_avg_sq`` are zeroed; the
    step count is shared by the tensor and stays.
    """
    targets = list(optimizer.state.keys()) if params is None else list(params)
    for p in targets:
        state = optimizer.state.get(p)
        if not state:
            continue
        if rows is None:
            del optimizer.state[p]
            continue
        index = torch.as_tensor(rows, dtype=torch.long)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = state.get(key)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                with writable(t) as whole:  # an FSDP2 shard: rows may live on other ranks
                    whole[index.to(whole.device)] = 0
