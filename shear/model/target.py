"""Where the pruned model will run: the ``target`` and the width rules that follow from it.

One word, ``--target`` (``shear.compile(..., target=...)``), names two axes, comma-separated and
each optional: the **format** the model is served in (``hf``: stock transformers, one width for
every layer; ``nas``: Nemotron-NAS/DeciLM ``block_configs``, per-layer MLP widths in multiples of
256; ``gguf``: llama.cpp, per-layer widths, k-quant rows of 256; ``shear``: ``shear.load`` only)
and the **device** (``cpu``, ``cuda``). ``auto`` (either axis, or the whole word) is resolved when
the run starts: the device from where the model is, the format from what the model is
(:func:`resolve_target`).

A resolved target answers two questions for every pruning group:

* **granularity** (:meth:`Target.granularity`): kept widths are multiples of it. ``channel`` and
  ``residual`` groups get ``lcm(device granularity, format granularity)``; ``head`` groups are not
  rounded (a kv-head family is already a whole block of rows). The device granularity is measured
  (:mod:`shear.kernels.widths`), the format's is fixed by the file format (:data:`FORMAT_GRANULARITY`).
* **layout** (:meth:`Target.shared_kinds`): the group kinds whose counts must be equal in every
  layer. ``hf`` shares all (the config has one width per kind), ``nas`` shares the kv-head counts,
  ``gguf`` and ``shear`` none.

A pass's explicit ``round_to`` overrides the target (:func:`round_steps`).

Example:
    >>> t = parse_target("nas,cpu")
    >>> t.format, t.device
    ('nas', 'cpu')
    >>> t = Target("nas", "cpu", device_granularity=8, device_source="measured")
    >>> t.granularity("channel"), t.granularity("head"), t.shared_kinds
    (256, 1, ('head',))
    >>> t.describe()
    'target nas,cpu: MLP widths in multiples of 256 (nas ffn_mult 256; cpu measured 8); heads and hidden width kept'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from shear.errors import InputError
from shear.graph.groups import GROUP_KINDS, PruningGroup
from shear.model.devices import model_device, model_dtype

__all__ = ["FORMAT_KINDS", "kinds_refusal",
    "Target", "parse_target", "resolve_target", "round_steps", "step_of", "layout_selection", "FORMATS", "DEVICES",
    "FORMAT_GRANULARITY", "SHARED_KINDS",
]

FORMATS: tuple[str, ...] = ("auto", "hf", "nas", "gguf", "shear")
"""Serving formats a target can name (``auto``: chosen when the run starts)."""

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""Devices a target can name (``auto``: where the model is)."""

FORMAT_GRANULARITY: dict[str, dict[str, int]] = {
    "hf": {},
    "shear": {},
    "nas": {"channel": 256},
    "gguf": {"channel": 256, "residual": 256},
}
"""Width step each format needs per group kind (1 where absent): Nemotron-NAS writes MLP widths as
``ffn_mult``, which readers turn back into multiples of 256; llama.cpp's k-quants quantise rows in
blocks of 256 (a row of another length stays f16), and rows run along the MLP width (``ffn_down``)
and along the hidden width (every other matrix)."""

_FORMAT_WHY: dict[str, str] = {"nas": "nas ffn_mult", "gguf": "gguf k-quant blocks"}

SHARED_KINDS: dict[str, tuple[str, ...]] = {
    "hf": GROUP_KINDS,
    "nas": ("head",),
    "gguf": (),
    "shear": (),
}
"""Group kinds whose counts every layer must share, per format: a stock transformers config holds
one width per kind; a Nemotron-NAS config one kv-head count; GGUF and shear folders hold per-layer
arrays."""

FORMAT_KINDS: dict[str, tuple[str, ...]] = {"nas": ("channel", "block")}
"""Group kinds a format can hold once pruned, where it cannot hold all: a Nemotron-NAS config has one
query-head count and one hidden width for every layer, and its readers take the head size as
``hidden_size / num_attention_heads``, so it holds per-layer MLP widths and whole blocks (``no_op``)
only (shear removes a kv head together with its query heads)."""

_ROUNDED_KINDS = ("channel", "residual")
_KIND_WORDS = {"channel": "MLP", "residual": "hidden"}


@dataclass(frozen=True)
class Target:
    """A format and a device, and once resolved the device's measured width granularity."""

    format: str = "auto"
    """One of :data:`FORMATS`."""
    device: str = "auto"
    """One of :data:`DEVICES` (a resolved target may name another torch device type, e.g. ``mps``)."""
    device_granularity: int = 0
    """Width step the device runs at full speed (from :mod:`shear.kernels.widths`); 0 until resolved."""
    device_source: str = ""
    """How :attr:`device_granularity` was found (``measured``, ``cached``, ``pinned by ...``)."""
    format_source: str = ""
    """Why this format, when ``auto`` chose it."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"target format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.device or self.device not in DEVICES and not self.device.isidentifier():
            raise InputError(f"target device {self.device!r} is not one of {', '.join(DEVICES)}")
        if isinstance(self.device_granularity, bool) or not isinstance(self.device_granularity, int) or self.device_granularity < 0:
            raise InputError(f"target device_granularity must be an integer >= 0, got {self.device_granularity!r}")

    @property
    def resolved(self) -> bool:
        """Whether nothing is left to ``auto`` and the device granularity is known."""
        return self.format != "auto" and self.device != "auto" and self.device_granularity > 0

    @property
    def spec(self) -> str:
        """The target as ``--target`` spells it, e.g. ``nas,cpu``."""
        return f"{self.format},{self.device}"

    def granularity(self, kind: str) -> int:
        """Kept widths of groups of ``kind`` are multiples of this (1: any width).

        ``channel`` and ``residual``: ``lcm(device granularity, format granularity)``; ``head``: 1.
        """
        if kind not in _ROUNDED_KINDS:
            return 1
        return math.lcm(max(self.device_granularity, 1), FORMAT_GRANULARITY.get(self.format, {}).get(kind, 1))

    @property
    def shared_kinds(self) -> tuple[str, ...]:
        """Group kinds whose counts every layer must share (:data:`SHARED_KINDS`)."""
        return SHARED_KINDS.get(self.format, ())

    def describe(self) -> str:
        """One line for the console: the target, the widths it asks for, and where the numbers come from."""
        step = self.granularity("channel")
        fmt = FORMAT_GRANULARITY.get(self.format, {}).get("channel", 1)
        why = [f"{_FORMAT_WHY[self.format]} {fmt}"] if fmt > 1 else []
        if self.device_granularity:
            source = self.device_source or "measured"
            why.append(f"{self.device} {source} {self.device_granularity}" if source in ("measured", "cached")
                       else f"{self.device} {self.device_granularity}, {source}")
        widths = f"MLP widths in multiples of {step}" if step > 1 else "MLP widths unrounded"
        layout = {"hf": "; equal widths in every layer", "nas": "; heads and hidden width kept"}.get(self.format, "")
        text = f"target {self.spec}: {widths} ({'; '.join(why) or 'any width'}){layout}"
        return text + (f" [{self.format_source}]" if self.format_source else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the report: the fields, and the granularity per group kind."""
        return {**asdict(self), "granularity": {k: self.granularity(k) for k in GROUP_KINDS}, "describe": self.describe()}


def parse_target(spec: str | Target | None) -> Target:
    """A :class:`Target` from ``--target`` text (``"nas,cuda"``, ``"cpu"``, ``"auto"``), a Target, or
    ``None`` (``auto``). Each word names a format or a device; ``cuda:1`` is ``cuda``.

    Raises :class:`~shear.errors.InputError` naming the allowed words for an unknown word, and for
    two words of the same axis.

    Example:
        >>> parse_target("cuda"), parse_target(None) == Target()
        (Target(format='auto', device='cuda', device_granularity=0, device_source='', format_source=''), True)
        >>> parse_target("tpu")
        Traceback (most recent call last):
        ...
        shear.errors.InputError: --target 'tpu': unknown word 'tpu'; give a format (auto, hf, nas, gguf, shear) and/or a device (auto, cpu, cuda), comma-separated, e.g. --target nas,cuda
    """
    if spec is None:
        return Target()
    if isinstance(spec, Target):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"target must be text such as 'nas,cuda' or a Target, got {type(spec).__name__}")
    allowed = (
        f"give a format ({', '.join(FORMATS)}) and/or a device ({', '.join(DEVICES)}), comma-separated, "
        "e.g. --target nas,cuda"
    )
    fmt: str | None = None
    dev: str | None = None
    words = [w.strip().lower() for w in spec.split(",")]
    if not any(words):
        raise InputError(f"--target {spec!r} is empty; {allowed}")
    for word in words:
        base = word.split(":", 1)[0] if word.startswith("cuda:") and word[5:].isdigit() else word
        if base == "auto":
            continue
        if base in FORMATS:
            if fmt is not None:
                raise InputError(f"--target {spec!r} names two formats ({fmt}, {base}); {allowed}")
            fmt = base
        elif base in DEVICES:
            if dev is not None:
                raise InputError(f"--target {spec!r} names two devices ({dev}, {base}); {allowed}")
            dev = base
        else:
            raise InputError(f"--target {spec!r}: unknown word {word!r}; {allowed}")
    return Target(fmt or "auto", dev or "auto")


def resolve_target(
    target: str | Target | None,
    model: nn.Module | None,
    *,
    nas_refusal: str | None,
    measure: Callable[[str, torch.dtype], tuple[int, str]],
    device: str | torch.device | None = None,
) -> Target:
    """``target`` with nothing left to ``auto``: a concrete format, device and device granularity.

    The facts come from the caller (this layer cannot read them): ``nas_refusal`` is why the
    Nemotron-NAS format cannot hold ``model`` (``None``: it can), ``measure(device type, dtype)``
    gives the device's width granularity and how it was found. ``device`` (the run's ``--device``)
    stands for the model's own device; a model on the meta device (planned from its config) runs
    on a GPU when this machine has one. Format ``auto`` is ``nas`` when the model fits it, else
    ``shear`` (per-layer widths, read by :func:`shear.load`).

    Example:
        >>> t = resolve_target("auto", torch.nn.Linear(2, 2), nas_refusal="no block_configs",
        ...                    measure=lambda dev, dtype: (8, "measured"))
        >>> t.spec, t.granularity("channel"), t.format_source
        ('shear,cpu', 8, 'auto format: shear (nas: no block_configs)')
    """
    t = parse_target(target)
    fmt, fmt_source = t.format, t.format_source
    if fmt == "auto":
        fmt = "nas" if nas_refusal is None else "shear"
        fmt_source = "auto format: nas (the model fits Nemotron-NAS block_configs)" if nas_refusal is None else (
            f"auto format: shear (nas: {nas_refusal})")
    dev = t.device
    if dev == "auto":
        where = torch.device(device) if device is not None else (model_device(model) if model is not None else torch.device("meta"))
        dev = where.type if where.type != "meta" else ("cuda" if torch.cuda.is_available() else "cpu")
    granularity, source = t.device_granularity, t.device_source
    if granularity == 0:
        dtype = model_dtype(model) if model is not None else torch.float32
        granularity, source = measure(dev, dtype)
    return Target(fmt, dev, granularity, source, fmt_source)


def kinds_refusal(fmt: str, kinds: Iterable[str]) -> str | None:
    """Why format ``fmt`` cannot hold a model pruned in ``kinds`` (``None``: it can; :data:`FORMAT_KINDS`).

    Example:
        >>> kinds_refusal("nas", ["channel"]), kinds_refusal("nas", ["channel", "head"])
        (None, 'nas holds per-layer MLP widths and whole blocks only; the pipeline may prune head')
    """
    allowed = FORMAT_KINDS.get(fmt)
    extra = sorted(set(kinds) - set(allowed)) if allowed is not None else []
    if not extra:
        return None
    return f"{fmt} holds per-layer MLP widths and whole blocks only; the pipeline may prune {', '.join(extra)}"


def round_steps(target: Target | None, groups: Iterable[PruningGroup], round_to: int) -> int | dict[int, int]:
    """The width step of each group for a pass with option ``round_to``: the option itself when it
    is set (> 0: it overrides the target), 1 without a target, else group id -> the target's
    :meth:`Target.granularity` of the group's kind.

    Example:
        >>> round_steps(None, [], 0), round_steps(Target("gguf", "cpu", 1), [], 8)
        (1, 8)
    """
    if round_to > 0:
        return round_to
    if target is None:
        return 1
    return {g.id: target.granularity(g.kind) for g in groups}


def layout_selection(target: Target | None, selection: str) -> tuple[str, tuple[str, ...]]:
    """A pass's ``selection`` option resolved against the target: ``(selection, kinds whose counts
    every layer shares)``. ``auto`` is ``shared`` for ``hf`` and ``uniform`` otherwise, with the
    target's shared kinds (:data:`SHARED_KINDS`); an explicit selection shares nothing more.

    Example:
        >>> layout_selection(Target("nas", "cpu", 1), "auto"), layout_selection(None, "auto")
        (('uniform', ('head',)), ('uniform', ()))
    """
    if selection != "auto":
        return selection, ()
    if target is None:
        return "uniform", ()
    return ("shared" if target.format == "hf" else "uniform"), target.shared_kinds


def step_of(steps: int | Mapping[int, int], gid: int) -> int:
    """The step of group ``gid`` in a :func:`round_steps` answer (1 when the mapping lacks it)."""
    return steps if isinstance(steps, int) else steps.get(gid, 1)

