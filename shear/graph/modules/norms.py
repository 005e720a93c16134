"""RMS-style norms: which modules compute ``x * rsqrt(mean(x^2) + eps) * (w + offset)``, and their rescale.

The ``rms_norm`` facet of the one module table (:mod:`shear.graph.modules.table`) serves both
the analysis and erasure:

- the analysis accepts a mean over a pruned width only inside a known RMS norm, and treats a known
  RMS norm as zero-preserving over its other dimensions (a per-head ``q_norm`` maps a zeroed head
  to zero, although its ``rsqrt(... + eps)`` alone does not);
- erasure rescales the weight and epsilon of each such norm whose width shrinks.

Types are looked up along the MRO, then predicates (:func:`register_norm_rescale`). A module whose
class name says ``RMSNorm`` but that no entry names is *probed*: its output on a random input is
compared with the formula for each stored-weight convention (``w`` as in LLaMA, ``1 + w`` as in
Gemma), and the convention that matches is cached for the type. One that matches neither is not an
RMS norm to shear, and a pruned width through it stays pinned.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class MyRMSNorm(nn.Module):
    ...     def __init__(self, d: int = 4) -> None:
    ...         super().__init__()
    ...         self.weight, self.epsilon = nn.Parameter(0.1 * torch.randn(d)), 1e-6
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) * (1 + self.weight)
    >>> find_rms_norm(MyRMSNorm())
    RmsNormSpec(eps_attr='epsilon', weight_offset=1.0)
    >>> find_rms_norm(nn.LayerNorm(4)) is None      # mean-centring: never rescalable
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shear.graph.modules.rms_norm_spec import RmsNormSpec
from shear.graph.modules.table import lookup_module, register_module

__all__ = [
    "RmsNormSpec",
    "EPS_ATTRS",
    "register_rms_norm",
    "register_norm_rescale",
    "find_rms_norm",
    "probe_rms_norm",
]


_PROBED: dict[type, RmsNormSpec | None] = {}

EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
"""Where a probed norm may keep epsilon, in the order they are tried."""


def register_rms_norm(cls: type, spec: RmsNormSpec) -> None:
    """Declare instances of ``cls`` (and subclasses) RMS norms written as ``spec`` says: a thin
    wrapper over ``register_module(cls, rms_norm=spec)``."""
    register_module(cls, rms_norm=spec)


def register_norm_rescale(
    predicate: Callable[[nn.Module], bool], eps_attr: str, weight_offset: float = 0.0
) -> None:
    """Declare modules matching ``predicate`` RMS norms ``x * rsqrt(mean(x^2) + eps) * (w + offset)``.

    Later registrations win over earlier ones. A thin wrapper over :func:`register_module` (the
    predicate registered also requires the module to have ``eps_attr``).
    """

    def is_norm(m: nn.Module) -> bool:
        return bool(predicate(m)) and hasattr(m, eps_attr)

    register_module(is_norm, rms_norm=RmsNormSpec(eps_attr, weight_offset))


def find_rms_norm(module: nn.Module) -> RmsNormSpec | None:
    """The spec of ``module`` if it is a known (or probed) RMS norm, else None."""
    spec: RmsNormSpec | None = lookup_module(module, "rms_norm")
    if spec is not None:
        return spec
    if "rmsnorm" not in type(module).__name__.lower():
        return None
    if type(module) not in _PROBED:
        spec = probe_rms_norm(module)
        if spec is None and _unprobeable(module):
            return None  # e.g. a meta-device skeleton: decide on a real instance
        _PROBED[type(module)] = spec
    return _PROBED[type(module)]


def _unprobeable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return not isinstance(w, torch.Tensor) or w.is_meta or not w.is_floating_point()


def probe_rms_norm(module: nn.Module) -> RmsNormSpec | None:
    """Which RMS-norm convention ``module`` computes, found by running it once; None if neither.

    The module must have a 1-D floating ``weight`` and an epsilon attribute named in
    :data:`EPS_ATTRS`. It runs on a seeded random ``(3, d)`` input of the weight's dtype and device.
    """
    if _unprobeable(module):
        return None
    w: torch.Tensor = module.weight  # type: ignore[assignment]
    eps_attr = next((n for n in EPS_ATTRS if isinstance(getattr(module, n, None), (int, float))), None)
    if w.dim() != 1 or eps_attr is None:
        return None
    eps = float(getattr(module, eps_attr))
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    try:
        with torch.no_grad():
            y: Any = type(module).forward(module, x)  # not module(x): no hooks run
    except Exception:  # a module that cannot take a plain (3, d) tensor is not one we can vouch for
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return None
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    xf, wf = x.double(), w.detach().double()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    for offset in (0.0, 1.0):
        if torch.allclose(y.double(), normed * (wf + offset), rtol=tol, atol=tol):
            return RmsNormSpec(eps_attr, offset)
    return None


def _register_optional(module: str, name: str, spec: RmsNormSpec) -> None:
    try:
        cls: Any = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return
    if isinstance(cls, type):
        register_module(cls, rms_norm=spec)


register_module(nn.RMSNorm, rms_norm=RmsNormSpec("eps"))
for _family, _cap in (("llama", "Llama"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("mistral", "Mistral"),
                      ("mixtral", "Mixtral"), ("phi3", "Phi3"), ("olmo2", "Olmo2")):
    _register_optional(f"transformers.models.{_family}.modeling_{_family}", f"{_cap}RMSNorm", RmsNormSpec("variance_epsilon"))
_register_optional("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", RmsNormSpec("eps", weight_offset=1.0))
_register_optional("transformers.models.t5.modeling_t5", "T5LayerNorm", RmsNormSpec("variance_epsilon"))
