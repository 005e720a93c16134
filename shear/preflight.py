"""Checks of a compile's model, inputs and data before any pass runs.

A bad input found halfway through a pipeline is reported as the failure of some pass (an
``IndexError`` in erase, NaN reported as erase "changing the model's function"), after minutes of
work. :func:`check_compile_inputs` finds the usual ones first and raises an
:class:`~shear.errors.InputError` (or :class:`~shear.errors.DataError`) that says what to fix:

* weights on the meta device when a pass needs their values;
* NaN or Inf in the weights;
* token ids that are not integers, negative, past the vocabulary, or sequences past the positions
  the model has;
* integer inputs to a model that computes in floating point (and has no embedding to take them);
* an example input with a zero-size dimension (batch 0, sequence length 0): nothing to trace or compare;
* training data with token ids past the vocabulary;

and :func:`check_verify_option` a ``verify`` tolerance that is not a finite number >= 0 (NaN would
fail every erase, blamed on erase).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(4, 2)
    >>> check_compile_inputs(net, (torch.arange(4).view(1, 4),), None, reads_weights=True)
    Traceback (most recent call last):
    ...
    shear.errors.InputError: example input 0 is torch.int64 but Linear computes in torch.float32 ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import chain
from typing import Any

import torch
from torch import nn

from shear.errors import DataError, InputError
from shear.model.facts import forward_logits

__all__ = ["check_compile_inputs", "check_verify_option"]


def _tensors(inputs: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        return [("0", inputs)]
    if isinstance(inputs, Mapping):
        return [(str(k), v) for k, v in inputs.items() if isinstance(v, torch.Tensor)]
    if isinstance(inputs, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
    return []


def _vocab(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    return n if isinstance(n, int) else None


def _check_ids(name: str, ids: torch.Tensor, vocab: int, limit: int | None, what: str) -> None:
    if ids.is_floating_point() or ids.is_complex():
        raise InputError(f"{what} {name!r} holds {ids.dtype} values; token ids must be integers (ids.long())")
    if ids.numel() == 0 or ids.is_meta:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise InputError(
            f"{what} {name!r} holds token id {bad}, outside the model's vocabulary of {vocab} (ids 0..{vocab - 1}); "
            "tokenize with this model's tokenizer"
        )
    if limit is not None and ids.dim() >= 1 and ids.shape[-1] > limit:
        raise InputError(
            f"{what} {name!r} has {ids.shape[-1]} positions, the model has {limit} (max_position_embeddings); "
            f"use at most {limit} tokens"
        )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """No NaN or Inf in ``t``, read ``chunk`` elements at a time along dim 0 (no ``t``-sized mask)."""
    if t.dim() == 0:
        return bool(torch.isfinite(t))
    rows = max(1, chunk * t.shape[0] // max(1, t.numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


def _check_weights(model: nn.Module, reads_weights: bool) -> None:
    named = list(chain(model.named_parameters(), model.named_buffers()))
    meta = [n for n, t in named if t.is_meta]
    if meta:
        if reads_weights:
            raise InputError(
                f"{type(model).__name__} has {len(meta)} tensors on the meta device (e.g. {meta[0]}): no weight values "
                "to prune. Load the weights first (from_pretrained without init_empty_weights or device_map='meta'), "
                "or run only discover-groups on a skeleton"
            )
        return
    bad = [n for n, t in named if t.is_floating_point() and t.numel() and not _all_finite(t.detach())]
    if bad:
        raise InputError(
            f"{type(model).__name__} has NaN or Inf weights in {bad[:5]}{'...' if len(bad) > 5 else ''} before "
            "pruning; the model is damaged (reload it, or check the run that produced it)"
        )


def _check_dtypes(model: nn.Module, inputs: Any) -> None:
    """An integer input to a float model without an embedding: run it once to tell a real mismatch."""
    compute = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if compute is None or any(isinstance(m, nn.Embedding) for m in model.modules()):
        return
    ints = [(n, t) for n, t in _tensors(inputs) if not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)]
    if not ints:
        return
    try:
        with torch.no_grad():
            forward_logits(model, inputs)
    except Exception as e:  # noqa: BLE001 - any failure here is the mismatch the caller must fix
        name, t = ints[0]
        raise InputError(
            f"example input {name} is {t.dtype} but {type(model).__name__} computes in {compute} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass inputs of the model's dtype (x.to({compute}))"
        ) from e


def check_verify_option(verify: object) -> None:
    """``shear.compile(verify=...)``: ``True`` (the default tolerance policy), ``False`` (no check), or an
    absolute tolerance that is a finite number >= 0; else an :class:`InputError` that blames the option.

    Example:
        >>> check_verify_option(1e-4)
        >>> check_verify_option(float("nan"))
        Traceback (most recent call last):
        ...
        shear.errors.InputError: shear.compile: verify=nan is not a tolerance; ...
    """
    if isinstance(verify, bool):
        return
    if isinstance(verify, (int, float)) and math.isfinite(verify) and verify >= 0:
        return
    raise InputError(
        f"shear.compile: verify={verify!r} is not a tolerance; give verify=True (the default policy), False (no "
        "equivalence check), or the largest allowed absolute difference, a finite number >= 0 (e.g. verify=1e-4)"
    )


def _check_shapes(inputs: Any) -> None:
    """Every example input tensor has at least one element along each dimension (batch, sequence)."""
    for name, t in _tensors(inputs):
        if t.dim() >= 1 and 0 in t.shape:
            dims = {0: "batch", 1: "sequence length"} if t.dim() >= 2 else {0: "length"}
            which = ", ".join(f"{dims.get(i, f'dimension {i}')} 0" for i, n in enumerate(t.shape) if n == 0)
            raise InputError(
                f"example input {name!r} has shape {tuple(t.shape)} ({which}): nothing to trace or compare; give at "
                "least one sequence of at least one token, e.g. torch.zeros(1, 16, dtype=torch.long)"
            )


def check_compile_inputs(
    model: nn.Module, example_inputs: Any, data: Any, *, reads_weights: bool
) -> None:
    """Raise :class:`InputError` / :class:`DataError` for inputs no pipeline can use; see the module doc.

    ``reads_weights``: some pass of the pipeline reads weight values (all but graph analysis).
    """
    _check_shapes(example_inputs)
    _check_weights(model, reads_weights)
    vocab = _vocab(model)
    if vocab is not None:
        from shear.codegen.hf_config import max_positions

        limit = max_positions(model)
        for name, t in _tensors(example_inputs):
            if name in ("0", "input_ids"):
                _check_ids(name, t, vocab, limit, "example input")
        for split in ("train", "validation"):
            for source, ids in (getattr(data, split, None) or {}).items():
                if isinstance(ids, torch.Tensor) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                    raise DataError(
                        f"data source {source!r} ({split}) holds token ids outside the model's vocabulary of {vocab}; "
                        "tokenize the text with this model's tokenizer"
                    )
    if reads_weights:
        _check_dtypes(model, example_inputs)
