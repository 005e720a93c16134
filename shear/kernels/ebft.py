"""Block-wise reconstruction of a pruned decoder against its dense teacher (the engine of ``ebft``).

A decoder LLM is a stack of blocks that each map the residual stream ``[b, L, hidden]`` to a new
one. EBFT (block-wise reconstruction fine-tuning; docs/lorashear.md) tunes the blocks of a sparse or pruned student one at a time
so that each reproduces the dense teacher's block output on calibration windows:

1. :func:`capture_block_inputs` runs the model on calibration ids up to the blocks and records
   block 0's input hidden states, plus the other arguments every block is called with (attention
   mask, ``position_embeddings``, ``position_ids``, ...), for both models, chunk by chunk;
2. for block ``i``: the teacher's outputs ``Y_i`` come from the teacher's own chain; the student's
   inputs are the outputs of the already tuned student blocks ``0..i-1``, so errors made early are
   corrected later; :func:`block_reconstruct` trains the student block with Adam to minimise
   ``MSE(student_block(X_i), Y_i)``, with the pruning masks fixed (pruned weights stay exactly
   zero; erased structures are simply not there).

Masks come from :func:`infer_masks`: a weight's exact zeros are its pruned entries, unless the
whole tensor is zero (a zero-initialised bias or ``lora_B``: nothing was pruned there), or an
explicit mask (``{param name: bool keep mask}``) says otherwise.

Example:
    >>> blocks = decoder_blocks(model)                                        # doctest: +SKIP
    >>> xs = capture_block_inputs(model, ids, batch_size=4)                  # doctest: +SKIP
    >>> ys = run_block(teacher_blocks[0], xt.hidden, xt.args[0], xt.kwargs[0])  # doctest: +SKIP
    >>> r = block_reconstruct(blocks[0], ys, xs.hidden, infer_masks(blocks[0]),
    ...                       args=xs.args[0], kwargs=xs.kwargs[0], lr=1e-4)  # doctest: +SKIP
    >>> r.mse_after <= r.mse_before                                          # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.errors import KernelError
from shear.model.blocks import decoder_blocks, unwrap_model
from shear.model.devices import model_device
from shear.model.facts import is_lora_param

__all__ = [
    "BlockInputs",
    "Reconstruction",
    "capture_block_inputs",
    "run_block",
    "block_mse",
    "infer_masks",
    "trainable_parameters",
    "block_reconstruct",
]

class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the blocks' inputs are recorded."""


@dataclass
class BlockInputs:
    """What the blocks of a model are called with on calibration data, one entry per chunk.

    ``hidden[c]`` is block 0's input on chunk ``c`` (``[b, L, hidden]``); ``args[i][c]`` and
    ``kwargs[i][c]`` are the other positional and keyword arguments block ``i`` gets on chunk
    ``c`` (tensors are shared between blocks, so storing them per block costs nothing).
    """

    hidden: list[torch.Tensor]
    args: list[list[tuple[Any, ...]]] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def width(self) -> int:
        """The residual width (last dim of the hidden states)."""
        return int(self.hidden[0].shape[-1])


def _call_lm(model: nn.Module, ids: torch.Tensor) -> None:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if getattr(getattr(unwrap_model(model), "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    model(**kwargs)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
    blocks: nn.ModuleList | None = None,
) -> BlockInputs:
    """Run ``model`` on ``ids`` ``[n, L]`` in chunks of ``batch_size`` and record the blocks' inputs.

    Forward pre-hooks (with kwargs) on every block record the arguments each block is called with;
    the hook of the last block raises a sentinel, so the final norm and head never run. Block 0's
    hidden states are kept; later blocks' hidden states are not (they are recomputed block by block
    from the student's own chain), only their other arguments, which may differ per block (sliding
    window layers get their own mask).

    Raises :class:`KernelError` when the forward pass never reaches the blocks.
    """
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise KernelError(f"calibration ids must be a [n, seq_len] long tensor, got {tuple(ids.shape)} {ids.dtype}")
    blocks = decoder_blocks(model) if blocks is None else blocks
    device = model_device(model)
    n_blocks = len(blocks)
    out = BlockInputs(hidden=[], args=[[] for _ in range(n_blocks)], kwargs=[[] for _ in range(n_blocks)])
    seen: list[bool] = [False] * n_blocks

    def make_hook(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if args:
                hidden, rest, kw = args[0], tuple(args[1:]), dict(kwargs)
            else:
                kw = dict(kwargs)
                hidden, rest = kw.pop("hidden_states", None), ()
            if not isinstance(hidden, torch.Tensor):
                raise KernelError(
                    f"block {i} ({type(module).__name__}) was called without hidden states as its first "
                    "argument or as hidden_states=; cannot capture its inputs"
                )
            if i == 0:
                out.hidden.append(hidden.detach())
            out.args[i].append(rest)
            out.kwargs[i].append(kw)
            seen[i] = True
            if i == n_blocks - 1:
                raise _Stop

        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, ids.shape[0], batch_size):
            seen[:] = [False] * n_blocks
            try:
                _call_lm(model, ids[start : start + batch_size].to(device))
            except _Stop:
                pass
            if not all(seen):
                missing = [i for i, s in enumerate(seen) if not s]
                raise KernelError(
                    f"the forward pass of {type(unwrap_model(model)).__name__} did not call decoder blocks "
                    f"{missing[:8]}; cannot capture their inputs"
                )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise KernelError(f"a decoder block returned {type(out).__name__}; expected hidden states (a tensor or a tuple)")


def run_block(
    block: nn.Module, hidden: torch.Tensor, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """``block(hidden, *args, **kwargs)`` and its output hidden states (tuple outputs unwrapped)."""
    return _first_tensor(block(hidden, *args, **(kwargs or {})))


def _chunk_args(args: Sequence[tuple[Any, ...]] | None, c: int) -> tuple[Any, ...]:
    return tuple(args[c]) if args else ()


def _chunk_kwargs(kwargs: Sequence[Mapping[str, Any]] | None, c: int) -> dict[str, Any]:
    return dict(kwargs[c]) if kwargs else {}


@torch.no_grad()
def block_mse(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    args: Sequence[tuple[Any, ...]] | None = None,
    kwargs: Sequence[Mapping[str, Any]] | None = None,
) -> float:
    """Mean squared error (fp32, over every element of every chunk) of ``block(inputs)`` vs ``targets``."""
    total, count = 0.0, 0
    for c, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        out = run_block(block, x, _chunk_args(args, c), _chunk_kwargs(kwargs, c))
        total += float(((out.float() - y.to(out.device).float()) ** 2).sum())
        count += y.numel()
    return total / max(count, 1)


def infer_masks(
    module: nn.Module,
    explicit: Mapping[str, torch.Tensor] | None = None,
    *,
    names: Mapping[int, str] | None = None,
) -> dict[str, torch.Tensor | None]:
    """Keep masks of ``module``'s parameters by (module-relative) name; ``None`` means dense.

    A parameter's exact zeros are its pruned entries unless the whole tensor is zero (a
    zero-initialised bias or ``lora_B``: nothing was pruned). ``explicit`` maps full parameter
    names (``names`` maps ``id(param)`` to that full name) to bool keep masks and wins where the
    shape still matches (after erasure it may not; then the zeros decide).

    Example:
        >>> lin = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0]]))
        >>> infer_masks(lin)["weight"].tolist()
        [[False, True], [True, False]]
    """
    masks: dict[str, torch.Tensor | None] = {}
    for name, p in module.named_parameters():
        full = names.get(id(p)) if names is not None else name
        given = explicit.get(full) if explicit is not None and full is not None else None
        if isinstance(given, torch.Tensor) and tuple(given.shape) == tuple(p.shape):
            keep = given.to(device=p.device, dtype=torch.bool)
            masks[name] = None if bool(keep.all()) else keep
            continue
        nz = p.detach() != 0
        masks[name] = None if bool(nz.all()) or not bool(nz.any()) else nz
    return masks


_HALF = (torch.float16, torch.bfloat16)


def trainable_parameters(block: nn.Module, train: str = "weights") -> dict[str, nn.Parameter]:
    """The parameters of ``block`` to tune: all of them (``"weights"``) or only LoRA's (``"lora"``).

    In ``"weights"`` mode LoRA adapter parameters are tuned too when present. Raises
    :class:`KernelError` for ``"lora"`` on a block without adapters.
    """
    params = dict(block.named_parameters())
    if train == "weights":
        return params
    if train == "lora":
        lora = {n: p for n, p in params.items() if is_lora_param(n)}
        if not lora:
            raise KernelError(
                f"train='lora' but block {type(block).__name__} has no LoRA adapters (lora_A/lora_B); "
                "wrap the model with peft LoRA first, or use train='weights'"
            )
        return lora
    raise KernelError(f"train must be 'weights' or 'lora', got {train!r}")


@dataclass
class Reconstruction:
    """What :func:`block_reconstruct` did to one block."""

    mse_before: float
    mse_after: float
    steps: int
    restored: bool = False
    """True when tuning made the block worse and its weights were put back."""
    losses: list[float] = field(default_factory=list)
    """Mean training loss of every epoch."""


def block_reconstruct(
    student_block: nn.Module,
    teacher_outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    masks: Mapping[str, torch.Tensor | None],
    *,
    args: Sequence[tuple[Any, ...]] | None = None,
    kwargs: Sequence[Mapping[str, Any]] | None = None,
    train: str = "weights",
    lr: float = 2e-4,
    epochs: int = 5,
    seed: int = 0,
    on_epoch: Any = None,
) -> Reconstruction:
    """Tune ``student_block`` so that ``student_block(inputs[c]) ≈ teacher_outputs[c]`` for every chunk.

    Adam over :func:`trainable_parameters` (everything else in the block is frozen for the
    duration), one step per chunk, chunks visited in a seeded random order each epoch; 16-bit
    weights are updated through fp32 master copies. Entries
    that ``masks`` marks as pruned get zero gradient and are re-zeroed after every step, so they
    stay exactly zero. The block's MSE is measured before and after on the same chunks; if tuning
    made it worse (a too large ``lr``), the original weights are restored, so the result is never
    worse than the input. ``args``/``kwargs`` are the block's other arguments, per chunk.
    """
    if len(inputs) != len(teacher_outputs) or not inputs:
        raise KernelError(
            f"block_reconstruct needs as many input chunks as target chunks (got {len(inputs)} and "
            f"{len(teacher_outputs)}), and at least one"
        )
    for x, y in zip(inputs, teacher_outputs, strict=True):
        if x.shape != y.shape:
            raise KernelError(
                f"student block inputs {tuple(x.shape)} and teacher outputs {tuple(y.shape)} differ in shape: "
                "the residual widths of the pruned and the dense model must match"
            )
    params = trainable_parameters(student_block, train)
    all_params = dict(student_block.named_parameters())
    flags = {n: p.requires_grad for n, p in all_params.items()}
    keep = {n: masks.get(n) for n in params}
    saved = {n: p.detach().clone() for n, p in params.items()}
    was_training = student_block.training
    student_block.eval()  # no dropout: reconstruction is deterministic
    before = block_mse(student_block, inputs, teacher_outputs, args=args, kwargs=kwargs)
    losses: list[float] = []
    steps = 0
    try:
        for n, p in all_params.items():
            p.requires_grad_(n in params)
        # 16-bit weights train through fp32 master copies (Adam's small steps vanish in bf16)
        master = {n: p.detach().float().clone() if p.dtype in _HALF else p for n, p in params.items()}
        opt = torch.optim.Adam(list(master.values()), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            total = 0.0
            for c in torch.randperm(len(inputs), generator=gen).tolist():
                opt.zero_grad(set_to_none=True)
                for p in params.values():
                    p.grad = None
                out = run_block(student_block, inputs[c], _chunk_args(args, c), _chunk_kwargs(kwargs, c))
                loss = torch.nn.functional.mse_loss(out.float(), teacher_outputs[c].to(out.device).float())
                loss.backward()
                for n, p in params.items():
                    m, w = keep[n], master[n]
                    if w is not p and p.grad is not None:
                        w.grad = p.grad.float()
                    if m is not None and w.grad is not None:
                        w.grad.mul_(m)
                opt.step()
                with torch.no_grad():
                    for n, p in params.items():
                        m, w = keep[n], master[n]
                        if m is not None:
                            w.mul_(m)
                        if w is not p:
                            p.copy_(w)
                total += float(loss.detach())
                steps += 1
            losses.append(total / len(inputs))
            if on_epoch is not None:
                on_epoch(losses[-1])
        after = block_mse(student_block, inputs, teacher_outputs, args=args, kwargs=kwargs)
        restored = False
        if not after <= before:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])
            after, restored = before, True
    finally:
        for n, p in all_params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        student_block.train(was_training)
    return Reconstruction(mse_before=before, mse_after=after, steps=steps, restored=restored, losses=losses)
