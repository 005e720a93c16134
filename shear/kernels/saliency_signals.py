"""What saliency reads besides the weights: blocks of rows, and the signals of calibration data.

Every saliency criterion is a sum of per-element terms, so a weight is read in blocks of rows
(:func:`row_blocks`, :data:`ROW_BLOCK_ELEMENTS`) and never copied whole in fp32. On calibration
windows, :func:`loss_gradients` and :func:`loss_gradient_rowsums` take the gradient of the causal-LM
loss (chunked, block by block checkpointed) with respect to chosen weights, and :func:`input_norms`
the L2 norms of each linear layer's input features (the ``activation`` criterion).

Example:
    >>> [(s.start, s.stop) for s in row_blocks((3, 4))]
    [(0, 3)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shear.errors import DataError, ShearError
from shear.model.blocks import decoder_blocks
from shear.model.devices import model_device
from shear.model.tensors import TensorTable

__all__ = [
    "ROW_BLOCK_ELEMENTS", "row_blocks", "add_rowsum", "rowsum", "loss_gradients",
    "loss_gradient_rowsums", "input_norms",
]


ROW_BLOCK_ELEMENTS = 1 << 23
"""Elements of a weight that saliency holds in fp32 at once (32 MB): every criterion is a sum over
elements, so a weight is scored in blocks of rows and never as whole fp32 copies (``W``, ``BA``,
``W + BA``, products: whole copies multiply a 16-bit model's peak memory). 32 MB is glibc's largest
mmap threshold: each freed block goes back to the OS on the CPU instead of fragmenting the heap
(measured with ``tools/bench_training_memory.py``; docs/results/)."""


def row_blocks(shape: Sequence[int]) -> list[slice]:
    """Slices along dim 0 of a tensor of ``shape``, each of at most :data:`ROW_BLOCK_ELEMENTS` (>= 1 row)."""
    if not shape:
        return [slice(None)]
    per = max(1, ROW_BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    return [slice(i, min(i + per, shape[0])) for i in range(0, shape[0], per)]


def add_rowsum(
    acc: dict[Any, torch.Tensor], key: Any, block: torch.Tensor, dim: int, rows: slice, size: int
) -> None:
    """Add the :func:`rowsum` along ``dim`` of ``block`` (the ``rows`` of a tensor with ``size``
    indices along ``dim``) into ``acc[key]``."""
    r = rowsum(block, dim)
    if dim == 0:
        if key not in acc:
            acc[key] = torch.zeros(size, dtype=torch.float64, device=r.device)
        acc[key][rows] += r
    else:
        acc[key] = acc[key] + r if key in acc else r


def rowsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of ``t`` over every dimension but ``dim`` (float64, on the tensor's device)."""
    if t.dim() == 1:
        return t.double()
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).double().sum(dim=1)



def _lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of ``batch``. For a plain transformers head (``output_head``) the logits
    are computed :data:`~shear.kernels.losses.LOSS_CHUNK_TOKENS` tokens at a time and recomputed in backward, so the full
    ``(batch, seq, vocab)`` fp32 logits (and their gradient) never exist: with a 128k vocabulary they
    were most of the memory of taylor saliency."""
    from shear.kernels.losses import LOSS_CHUNK_TOKENS, model_nll_sum

    return model_nll_sum(model, batch, batch, chunk=LOSS_CHUNK_TOKENS, cap=True) / batch[:, 1:].numel()


def _checkpoint_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


@contextmanager
def _checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, every decoder block of ``model`` runs under (non-reentrant) activation
    checkpointing: a backward pass keeps the blocks' inputs and recomputes one block at a time, so
    the calibration gradients of taylor saliency cost one block's activations, not the model's (on a
    7B at 4 x 256 calibration tokens, predicted: 0.5 GB instead of 9 GB). Eval-mode forwards are deterministic,
    so the gradients are the same. Models without known decoder blocks run as they are."""
    try:
        blocks = list(decoder_blocks(model))
    except ShearError:
        blocks = []
    patched = [b for b in blocks if "forward" not in b.__dict__]
    for b in patched:
        b.forward = partial(_checkpoint_call, b.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for b in patched:
            del b.forward


def _check_ids(ids: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] < 2:
        raise DataError(f"{what}: calibration ids must be a [n, seq_len >= 2] long tensor (TextData.calibration(n, seq_len))")
    return ids


def loss_gradients(
    model: nn.Module, names: Iterable[str], calibration_ids: torch.Tensor, *, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Mean gradient of the next-token loss over ``calibration_ids`` w.r.t. the named parameters.

    Frozen base weights of a LoRA model get ``requires_grad`` only for the duration; their gradient
    is the gradient w.r.t. the effective weight ``W + s·BA`` (the two enter the output as a sum).
    Every parameter's ``requires_grad`` and ``.grad`` are restored afterwards; the model is run in
    eval mode (no dropout). Gradients come back in the parameter's dtype (bf16 for a bf16 model),
    never as a full fp32 copy of the model: callers upcast one tensor at a time.
    """
    ids = _check_ids(calibration_ids, "loss gradients")
    table = TensorTable(model)
    targets = {table.resolve(n): table.tensors[table.resolve(n)] for n in names}
    targets = {n: t for n, t in targets.items() if isinstance(t, nn.Parameter)}
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    was_training = model.training
    device = model_device(model)
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for t in targets.values():
            t.requires_grad_(True)
        model.eval()
        n = ids.shape[0]
        with _checkpointed_blocks(model):
            for i in range(0, n, max(1, batch_size)):
                batch = ids[i : i + batch_size].to(device)
                loss = _lm_loss(model, batch) * (batch.shape[0] / n)
                loss.backward()
        return {
            name: (t.grad.detach() if t.grad is not None else torch.zeros_like(t))
            for name, t in targets.items()
        }
    finally:
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)


def loss_gradient_rowsums(
    model: nn.Module,
    needed: Mapping[str, Iterable[int]],
    calibration_ids: torch.Tensor,
    *,
    effective: Callable[[str, slice], torch.Tensor],
    batch_size: int = 4,
) -> dict[tuple[str, int], torch.Tensor]:
    """``(canonical name, dim)`` -> float64 row sums of ``E ⊙ G`` along ``dim``, without keeping ``G``.

    ``G`` is the mean loss gradient of the weight (as :func:`loss_gradients`), ``effective(name, rows)``
    the ``rows`` (a slice of dim 0) of its effective fp32 weight ``E``. Each gradient is consumed by a
    post-accumulate-grad hook the moment autograd finishes it and then dropped, so at most one
    weight's gradient exists at a time, and it is reduced in blocks of rows
    (:data:`ROW_BLOCK_ELEMENTS`): the memory of taylor1 on a 16-bit 7B model is that of its largest
    weight in 16 bits, not a second model. The product is linear in ``G``, so summing per batch gives
    the row sums of the mean gradient (up to float rounding).

    Example:
        >>> rows = loss_gradient_rowsums(model, {"model.layers.0.mlp.up_proj.weight": {0}}, ids,
        ...                              effective=lambda n, r: table.tensors[n][r].float())  # doctest: +SKIP
    """
    ids = _check_ids(calibration_ids, "loss gradients")
    table = TensorTable(model)
    targets = {c: table.tensors[c] for c in needed if isinstance(table.tensors[c], nn.Parameter)}
    params = list({id(p): p for p in model.parameters()}.values())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    sums: dict[tuple[str, int], torch.Tensor] = {}

    def consume(canon: str) -> Any:
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            if g is None:
                return
            with torch.no_grad():
                for rows in row_blocks(g.shape):
                    prod = effective(canon, rows) * g[rows].to(torch.float32)
                    for dim in needed[canon]:
                        add_rowsum(sums, (canon, dim), prod, dim, rows, g.shape[dim])
                    del prod

        return hook

    was_training = model.training
    device = model_device(model)
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for canon, t in targets.items():
            t.requires_grad_(True)
            handles.append(t.register_post_accumulate_grad_hook(consume(canon)))
        model.eval()
        n = ids.shape[0]
        with _checkpointed_blocks(model):
            for i in range(0, n, max(1, batch_size)):
                batch = ids[i : i + batch_size].to(device)
                (_lm_loss(model, batch) * (batch.shape[0] / n)).backward()
        return sums
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in saved:
            p.grad = grad
            p.requires_grad_(flag)
        model.train(was_training)


def _input_dim(module: nn.Module) -> int | None:
    """Which dim of ``module.weight`` indexes input features (1 for Linear, 0 for transformers Conv1D)."""
    if isinstance(module, nn.Linear):
        return 1
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return 0
    return None


@torch.no_grad()
def input_norms(
    model: nn.Module, names: Iterable[str], calibration_ids: torch.Tensor, *, batch_size: int = 4
) -> dict[str, tuple[torch.Tensor, int]]:
    """Canonical weight name -> ``(‖X_j‖₂ over calibration tokens [in_features], input dim of the weight)``.

    Only weights of ``nn.Linear`` / transformers ``Conv1D`` modules get norms (a tied embedding
    gets those of the ``lm_head`` that shares it); forward pre-hooks collect them.
    """
    ids = _check_ids(calibration_ids, "activation norms")
    table = TensorTable(model)
    owners: dict[str, tuple[nn.Module, int]] = {}
    for name in names:
        canon = table.resolve(name)
        for mod, attr in table.locations[canon]:
            d = _input_dim(mod) if attr == "weight" else None
            if d is not None:
                owners[canon] = (mod, d)
                break
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(canon: str, width: int) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.shape[-1] != width:
                return
            s = x.detach().float().pow(2).reshape(-1, width).sum(dim=0)
            sums[canon] = s if canon not in sums else sums[canon] + s

        return hook

    for canon, (mod, d) in owners.items():
        handles.append(mod.register_forward_pre_hook(hook_for(canon, int(table.tensors[canon].shape[d]))))
    from shear.kernels.losses import head_bypassed, output_head

    head = output_head(model)
    # no norm is read at the head: skip it, and with it the (batch, seq, vocab) logits
    skip_head = head is not None and all(mod is not head for mod, _ in owners.values())
    was_training = model.training
    device = model_device(model)
    try:
        model.eval()
        with head_bypassed(model) if skip_head else nullcontext():
            for i in range(0, ids.shape[0], max(1, batch_size)):
                model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {canon: (sums[canon].sqrt(), owners[canon][1]) for canon in sums}


# -- scoring ------------------------------------------------------------------------------------


