"""Linear widths that fall off the fast kernels: not a multiple of the target's granularity.

Matmul kernels work in tiles (vector lanes on a CPU, tensor-core tiles on a GPU, 256-row blocks for
llama.cpp's k-quants); a pruned width that is not a multiple of the tile can run slower than the wider
dense one. :func:`slow_widths` lists every ``nn.Linear`` whose ``in_features`` or ``out_features`` is
not a multiple of ``granularity`` (:func:`shear.model.devices.untiled_linears`, the rule erase warns
by), grouped by module role across layers, so a speed report can name the widths that cost speed and
the fix (prune for the device that will run the model).

Example:
    >>> from torch import nn

from shear.model.devices import untiled_linears
    >>> model = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(16, 12), nn.Linear(16, 12)])})
    >>> slow_widths(model, 8)
    ['layers.* out_features 12 (layers 0-1)']
"""

from __future__ import annotations

import re

from torch import nn

from shear.model.devices import untiled_linears

__all__ = ["slow_widths", "linear_widths"]

_LAYER = re.compile(r"^(?P<head>.*?)\.(?P<index>\d+)(?:\.(?P<tail>.*))?$")
"""A module path with a layer index: ``model.layers.3.mlp.down_proj`` -> head, index 3, tail."""


def linear_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (in_features, out_features)}`` of every ``nn.Linear`` (a LoRA wrapper's base
    layer under the wrapper's path)."""
    out: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            path = name.removesuffix(".base_layer")
            if ".lora_" not in path:
                out[path] = (mod.in_features, mod.out_features)
    return out


def slow_widths(model: nn.Module, granularity: int, *, reference: nn.Module | None = None) -> list[str]:
    """Every Linear width of ``model`` that is not a multiple of ``granularity``, one line per module
    role and width, e.g. ``"mlp.down_proj in_features 969 (layers 3-4, 7)"`` (roles with the same
    width in the same layers share a line); empty when all fit.

    With ``reference`` (the dense model), a width the reference has at the same place is left out:
    only the widths pruning made are listed (a vocabulary of 32001 is not pruning's doing).
    """
    if granularity <= 1:
        return []
    ref = linear_widths(reference) if reference is not None else {}
    widths = linear_widths(model)
    found: dict[tuple[str, str, int], list[str]] = {}
    for name in untiled_linears(model, granularity):  # the one rule for "off the tiles" (erase warns by it too)
        path = name.removesuffix(".base_layer")
        if path not in widths:
            continue  # a LoRA factor: its rank is the adapter's choice, not pruning's
        n_in, n_out = widths[path]
        for side, width, index in (("in_features", n_in, 0), ("out_features", n_out, 1)):
            if width % granularity == 0 or (path in ref and ref[path][index] == width):
                continue
            m = _LAYER.match(path)
            role, layer = (m.group("tail") or m.group("head") + ".*", m.group("index")) if m else (path, "")
            found.setdefault((role, side, width), []).append(layer)
    merged: dict[tuple[str, int, tuple[str, ...]], list[str]] = {}
    for (role, side, width), layers in found.items():  # roles with the same width in the same layers: one line
        merged.setdefault((side, width, tuple(x for x in layers if x)), []).append(role)
    lines = []
    for (side, width, where), roles in merged.items():
        lines.append(f"{', '.join(sorted(roles))} {side} {width}" + (f" (layers {_ranges(where)})" if where else ""))
    return sorted(lines)


def _ranges(layers: tuple[str, ...]) -> str:
    """``("0", "1", "2", "5")`` -> ``"0-2, 5"``."""
    nums = sorted(int(x) for x in layers)
    spans: list[list[int]] = []
    for n in nums:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
