"""Saliency of whole blocks: what the model loses when one attention or MLP branch is skipped.

Two measures on calibration windows, one number per block (lower = safer to remove):

``loss``
    ``loss(model with the branch's output zeroed) - loss(model)``, the mean next-token loss over the
    windows: one extra forward pass per block, the most faithful of the two.
``residual``
    ``mean over tokens of ||f(x)|| / ||r||``: how far the branch moves the residual stream ``r`` at
    the point where its output ``f(x)`` is added (``r`` is read at the input of the norm that feeds
    the branch). One forward pass for all blocks; ShortGPT's observation that a layer which hardly
    changes its input can go, applied per branch.

Skipping a branch zeroes its output with a forward hook, which is exactly what erasing it computes
(:class:`~shear.model.blocks.RemovedBranch`), so the ``loss`` measure is the erased model's loss.

Example:
    >>> s = block_saliency(model, {7: ("model.layers.0.mlp", "model.layers.0.post_attention_layernorm")},
    ...                    ids, measure="residual")                            # doctest: +SKIP
    >>> s[7].shape                                                              # doctest: +SKIP
    torch.Size([1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from shear.errors import KernelError
from shear.kernels.losses import LOSS_CHUNK_TOKENS, model_nll_sum

__all__ = ["BLOCK_MEASURES", "block_saliency", "calibration_loss", "skipped"]

BLOCK_MEASURES: tuple[str, ...] = ("loss", "residual")
"""The measures :func:`block_saliency` knows."""


def _zero_output(_m: nn.Module, _args: Any, out: Any) -> Any:
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]), *out[1:])
    return torch.zeros_like(out)


@contextmanager
def skipped(model: nn.Module, modules: list[str]) -> Iterator[None]:
    """Within the block, the branch ``modules`` of ``model`` add nothing (their outputs are zeroed)."""
    handles = [model.get_submodule(name).register_forward_hook(_zero_output) for name in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibration_loss(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token loss of causal LM ``model`` over the windows ``ids`` ``[n, L]``."""
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.shape[0] == 0:
        raise KernelError(f"calibration windows must be [n, seq_len >= 2], got {tuple(ids.shape)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = 0.0
    for i in range(0, ids.shape[0], batch_size):
        batch = ids[i : i + batch_size].to(device)
        total += float(model_nll_sum(model, batch, batch, chunk=LOSS_CHUNK_TOKENS, cap=True))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


@torch.no_grad()
def _residual(model: nn.Module, branches: Mapping[int, tuple[str, str]], ids: torch.Tensor, batch_size: int) -> dict[int, torch.Tensor]:
    sums: dict[int, float] = {gid: 0.0 for gid in branches}
    stream: dict[int, torch.Tensor] = {}
    handles = []

    def keep_stream(gid: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any) -> None:
            stream[gid] = args[0].detach().float().norm(dim=-1)
        return hook

    def measure(gid: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            f = (out[0] if isinstance(out, tuple) else out).detach().float().norm(dim=-1)
            sums[gid] += float((f / stream.pop(gid).clamp_min(1e-12)).sum())
        return hook

    for gid, (branch, norm) in branches.items():
        handles.append(model.get_submodule(norm).register_forward_pre_hook(keep_stream(gid)))
        handles.append(model.get_submodule(branch).register_forward_hook(measure(gid)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for i in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {gid: torch.tensor([s / ids.numel()]) for gid, s in sums.items()}


def block_saliency(
    model: nn.Module,
    branches: Mapping[int, tuple[str, str]],
    ids: torch.Tensor,
    *,
    measure: str = "loss",
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Saliency ``[1]`` of every block: group id -> (branch module, norm module) in ``model``.

    ``measure`` is one of :data:`BLOCK_MEASURES`; ``progress`` is called with 1 per block measured.
    """
    if measure not in BLOCK_MEASURES:
        raise KernelError(f"block saliency measure must be one of {', '.join(BLOCK_MEASURES)}, got {measure!r}")
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise KernelError(f"calibration windows must be [n, seq_len >= 2], got {tuple(ids.shape)}")
    if measure == "residual":
        return _residual(model, branches, ids, batch_size)
    base = calibration_loss(model, ids, batch_size=batch_size)
    out: dict[int, torch.Tensor] = {}
    for gid, (branch, _) in branches.items():
        with skipped(model, [branch]):
            out[gid] = torch.tensor([calibration_loss(model, ids, batch_size=batch_size) - base])
        if progress is not None:
            progress(1)
    return out
