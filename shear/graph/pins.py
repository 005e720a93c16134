"""Kinds of pin reasons: what a pinned space is pinned *for*, independent of wording.

A pin reason is a sentence written where the rule fires (``"aten.cos.default: f(0) != 0, ..."``,
``"head_dim (attention scale and rotary embedding depend on it)"``). Its wording names ops and
modules that move between torch and transformers releases; its *kind* does not. Golden files and
tests compare kinds, so an upstream release that traces ``expand`` where it used to trace
``cumsum`` changes no expectation, while a space that becomes prunable or pinned for another
kind of reason still does.

The table is ordered; the first pattern that matches a reason gives its kind. A reason no entry
matches is ``"other"``, and the test suites assert that no traced architecture produces one, so a
new rule must add its kind here.

Example:
    >>> pin_kind("head_dim (attention scale and rotary embedding depend on it)")
    'head-dim'
    >>> pin_kind("aten.cos.default: f(0) != 0, a zeroed channel would not stay zero")
    'not-zero-preserving'
    >>> pin_kinds(("model output", "model output", "unknown op aten.special_entr.default"))
    ('output', 'unknown-op')
    >>> pin_kind("a reason no rule writes")
    'other'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["PIN_KINDS", "pin_kind", "pin_kinds"]

PIN_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("output", r"^model output"),
        ("input", r"^model input"),
        ("constant", r"^constant tensor"),
        ("vocabulary", r"^vocabulary"),
        ("lora-rank", r"^LoRA rank"),
        ("head-dim", r"^head_dim|^inner factor of prunable structures"),
        ("attention", r"^GQA|^attention heads"),
        ("routing", r"^router |^MoE "),
        ("unknown-op", r"^unknown op|^getitem of an unknown value"),
        ("no-role", r"^no rule gives|^no producing parameter|^non-uniform layout"),
        (
            "not-zero-preserving",
            r"f\(0\) != 0|adds a constant|not guaranteed to stay zero|^divides by a channel|^pow with",
        ),
        ("reduction", r"over channels|over all elements|along this dimension"),
        ("norm", r"LayerNorm|^instance norm|^GroupNorm"),
        ("layout", r"^reshape|^broadcast by expand|^slice across|^conflicting|^joined dimensions|^stacked"),
        ("spatial", r"^spatial dimension"),
        ("statistics", r"^norm statistics|^attention statistics"),
        ("indexing", r"slice|select/unbind|single ind|size-1 piece|^indexed/reordered"),
        ("convolution", r"^grouped convolution"),
        ("matmul", r"^matmul"),
    )
)
"""``(kind, pattern)`` in match order; extend it when a new rule pins for a new kind of reason."""


def pin_kind(reason: str) -> str:
    """The kind of one pin reason (``"other"`` when no pattern matches)."""
    for kind, pattern in PIN_KINDS:
        if pattern.search(reason):
            return kind
    return "other"


def pin_kinds(reasons: Iterable[str]) -> tuple[str, ...]:
    """The sorted, distinct kinds of ``reasons``."""
    return tuple(sorted({pin_kind(r) for r in reasons}))
