"""Replay the decoder blocks a perturbation cannot change: knowledge distribution's measurements start
at the first block whose weights they zero.

Zeroing weights of block ``L`` leaves the outputs of blocks ``0 .. L-1`` as they were, so a
measurement that reruns the same evaluation batches needs them only once. :class:`BlockReplay`
records the blocks' outputs during the unperturbed evaluation (:meth:`BlockReplay.record`), and
during a measurement (:meth:`BlockReplay.replay`) makes the blocks before the start return the
recorded outputs instead of computing them; everything outside the blocks (embeddings, masks,
rotary tables, the final norm and head) still runs. The blocks from the start on compute on the
very tensor the unperturbed run computed, so the measurement is the one a full forward gives, bit
for bit. :func:`first_blocks` says, per tensor, which block first reads it (``None``: something
outside the blocks reads it too, so nothing may be replayed).

Only every ``stride``-th boundary is kept when the outputs of every block would exceed ``max_bytes``
(the replay then starts at the last kept boundary at or before the first zeroed block).

Example:
    >>> replay = BlockReplay(model)                                   # doctest: +SKIP
    >>> with replay.record():
    ...     base = evaluate(model)                                    # doctest: +SKIP
    >>> with replay.replay(start=12):
    ...     ppl = evaluate(model)      # blocks 0..11 replayed          # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from shear.errors import ModelError
from shear.model.blocks import decoder_blocks

__all__ = ["BlockReplay", "first_blocks", "first_block_of", "REPLAY_BYTES"]

REPLAY_BYTES = 1 << 30
"""Most bytes of recorded block outputs :class:`BlockReplay` keeps by default."""


def first_blocks(model: nn.Module) -> dict[int, int | None]:
    """``id(tensor)`` -> index of the first decoder block holding it, or ``None`` when a module outside
    the blocks holds it too (a tied embedding); ``{}`` for a model without decoder blocks."""
    try:
        blocks = decoder_blocks(model)
    except ModelError:
        return {}
    inside: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            inside.setdefault(id(m), i)
    out: dict[int, int | None] = {}
    for m in model.modules():
        where = inside.get(id(m))
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is None:
                continue
            if where is None or id(t) in out and out[id(t)] is None:
                out[id(t)] = None
            else:
                seen = out.get(id(t))
                out[id(t)] = where if seen is None else min(seen, where)
    return out


def first_block_of(tensors: Iterable[torch.Tensor], table: dict[int, int | None]) -> int:
    """The first block any of ``tensors`` is read by (0 when one is read outside the blocks or unknown)."""
    starts = [table.get(id(t)) for t in tensors]
    return min((s if s is not None else 0) for s in starts) if starts else 0


class BlockReplay:
    """The decoder blocks' outputs on the unperturbed model, per evaluation batch, replayed on request."""

    def __init__(self, model: nn.Module, *, max_bytes: int = REPLAY_BYTES) -> None:
        try:
            self.blocks: nn.ModuleList | None = decoder_blocks(model)
        except ModelError:
            self.blocks = None
        self.model = model
        self.max_bytes = max_bytes
        self.stride = 1
        self.outputs: list[dict[int, Any]] = []
        """Per evaluation batch (forward of ``model``, in order): block index -> its recorded output."""
        self._batch = -1

    def start_of(self, first: int) -> int:
        """Where a replay for a perturbation whose first zeroed block is ``first`` starts (a kept boundary)."""
        if not self.outputs or self.blocks is None:
            return 0
        return (first // self.stride) * self.stride

    def _count(self, module: nn.Module, args: Any) -> None:
        self._batch += 1

    @contextmanager
    def record(self) -> Iterator[BlockReplay]:
        """Record every block's output during the forwards of the ``with`` block (the unperturbed run)."""
        self.outputs, self._batch = [], -1
        if self.blocks is None:
            yield self
            return
        with ExitStack() as stack:
            stack.callback(self.model.register_forward_pre_hook(self._count).remove)
            for i, block in enumerate(self.blocks):
                stack.callback(block.register_forward_hook(self._keeper(i)).remove)
            yield self
        self._thin()

    def _keeper(self, i: int) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            while len(self.outputs) <= self._batch:
                self.outputs.append({})
            self.outputs[self._batch][i] = output

        return keep

    def _thin(self) -> None:
        """Keep every ``stride``-th boundary (the output of block ``k * stride - 1``) within ``max_bytes``."""
        total = sum(_nbytes(o) for batch in self.outputs for o in batch.values())
        self.stride = max(1, math.ceil(total / self.max_bytes)) if self.max_bytes > 0 else len(self.blocks or ())
        self.outputs = [{i: o for i, o in batch.items() if (i + 1) % self.stride == 0} for batch in self.outputs]

    @contextmanager
    def replay(self, start: int) -> Iterator[None]:
        """Within the ``with`` block, blocks ``0 .. start-1`` return their recorded outputs (``start`` must be
        a kept boundary, :meth:`start_of`); the forwards must be the recorded ones, in the same order."""
        if start <= 0 or self.blocks is None or not self.outputs:
            yield
            return
        if any(start - 1 not in batch for batch in self.outputs):
            raise ModelError(f"BlockReplay: block {start - 1}'s output was not kept (stride {self.stride}); use start_of")
        self._batch = -1
        blocks = list(self.blocks)[:start]
        with ExitStack() as stack:
            stack.callback(self.model.register_forward_pre_hook(self._count).remove)
            for block in blocks:
                stack.callback(_unpatch, block, block.__dict__.get("forward"))  # an accelerate hook's wrapper stays
                block.forward = self._recorded(start - 1)  # type: ignore[method-assign]
            yield

    def _recorded(self, last: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = self.outputs[self._batch][last]
            return out.clone() if isinstance(out, torch.Tensor) else out

        return forward


def _unpatch(block: nn.Module, before: Any) -> None:
    if before is None:
        block.__dict__.pop("forward", None)
    else:
        block.__dict__["forward"] = before


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(o) for o in output)
    return 0
