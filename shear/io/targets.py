"""A run's target resolved against the model: the facts ``auto`` needs, read where they live.

:func:`shear.model.target.resolve_target` decides; this module gathers what it decides from:
whether the Nemotron-NAS format can hold the model (:func:`shear.io.nas.nas_refusal`; a model it
cannot check does not fit) and the device's width granularity (:mod:`shear.io.width_cache`).
``shear.compile``, the CLI and the planning commands all resolve through :func:`target_for`.

Example:
    >>> import torch
    >>> t = target_for("gguf,cpu", torch.nn.Linear(4, 4))     # the device's step measured once, then cached
    >>> t.spec, t.granularity("channel") % 256, t.granularity("head")
    ('gguf,cpu', 0, 1)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shear.codegen.hf_config import layer_widths
from shear.errors import PipelineError, ShearError
from shear.io.width_cache import device_granularity
from shear.model.target import Target, kinds_refusal, parse_target, resolve_target

__all__ = ["target_for", "nas_fit"]


def nas_fit(model: nn.Module | None) -> str | None:
    """Why the Nemotron-NAS format cannot hold ``model`` once pruned (``None``: it can): its architecture
    (:func:`shear.io.nas.nas_refusal`), and MLP widths that are multiples of 256 before pruning (a
    smaller model, e.g. 384 wide, has no room for whole 256-steps)."""
    if model is None:
        return "no model to check"
    try:
        from shear.io.nas import FFN_MULTIPLE, nas_refusal  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "this shear has no Nemotron-NAS writer"
    try:
        refusal = nas_refusal(model)
    except ShearError as e:  # a model the check cannot read does not fit
        return str(e)
    if refusal is not None:
        return refusal
    off = sorted({w.n_ff for w in layer_widths(model) or () if w.n_ff % FFN_MULTIPLE})
    return f"MLP width {off[0]} is not a multiple of {FFN_MULTIPLE}" if off else None


def target_for(
    spec: str | Target | None, model: nn.Module | None, *, device: str | torch.device | None = None,
    kinds: Iterable[str] | None = None,
) -> Target:
    """``spec`` (``--target`` text, a :class:`Target`, or ``None`` for ``auto``) resolved for ``model``;
    ``device`` is where the run moves the model (``--device``), when it does; ``kinds`` are the group
    kinds the run prunes (``None``: not known), which a format may not hold (:func:`kinds_refusal`):
    ``auto`` then picks another format, a named one is refused before any work (PipelineError)."""
    target = parse_target(spec)
    refusal = kinds_refusal(target.format, kinds or ())
    if refusal is not None:
        raise PipelineError(
            f"--target {target.format}: {refusal}; prune those kinds for --target shear or gguf, or drop them "
            "from the passes' kinds (e.g. lhspg{kinds=[channel]})"
        )
    if target.resolved:
        return target
    refusal = nas_fit(model) if target.format == "auto" else None
    if refusal is None and target.format == "auto":
        refusal = kinds_refusal("nas", kinds or ())
    return resolve_target(target, model, nas_refusal=refusal, measure=device_granularity, device=device)
