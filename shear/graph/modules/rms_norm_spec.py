"""How one RMS-norm type is written (where epsilon lives, how the weight is stored) and its rescale.

The ``rms_norm`` facet of a module's entry in the module table (:mod:`shear.graph.modules.table`);
:mod:`shear.graph.modules.norms` finds the spec of a module and probes unknown ``*RMSNorm`` classes.

Example:
    >>> from torch import nn
    >>> norm = nn.RMSNorm(4, eps=1e-6)
    >>> RmsNormSpec("eps").rescale(norm, 4, 2)      # width 4 -> 2: weight * sqrt(2), eps * 2
    >>> round(float(norm.weight[0].detach()), 4), norm.eps
    (1.4142, 2e-06)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import GraphError

__all__ = ["RmsNormSpec"]


@dataclass(frozen=True)
class RmsNormSpec:
    """How one RMS-norm type is written: where epsilon lives and how the weight is stored."""

    eps_attr: str
    """Attribute holding epsilon (``variance_epsilon`` for LLaMA, ``eps`` for ``nn.RMSNorm``)."""
    weight_offset: float = 0.0
    """The norm multiplies by ``weight + weight_offset`` (Gemma stores ``weight`` around 0, offset 1)."""

    def _scale_(self, w: torch.Tensor, ratio: float) -> torch.Tensor:
        return w.add_(self.weight_offset).mul_(ratio**0.5).sub_(self.weight_offset)

    def reference_weight(self, weight: torch.Tensor, d: int, d_new: int) -> torch.Tensor:
        """The fp32 weight under which the norm over ``d`` channels computes exactly what the norm
        rescaled to ``d_new`` (:meth:`rescale`, rounded to ``weight``'s dtype) computes.

        In fp32 the rescaled weight is exact up to 1e-7; in bf16 rounding it moves outputs by up to
        2^-9 of their size, a real change of the function. Verification computes the masked
        reference with this weight, so it compares like with like in any dtype.

        Example:
            >>> spec = RmsNormSpec("eps")
            >>> w = torch.full((4,), 0.3, dtype=torch.bfloat16)
            >>> ref = spec.reference_weight(w, 4, 3)
            >>> ref.dtype, bool((ref - 0.3).abs().max() < 2e-3), bool(ref[0] != w[0].float())
            (torch.float32, True, True)
        """
        small = self._scale_(weight.detach().clone(), d / d_new)
        return (small.float() + self.weight_offset) / (d / d_new) ** 0.5 - self.weight_offset

    def scale_weight(self, weight: torch.Tensor, d: int, d_new: int) -> torch.Tensor:
        """Rescale a norm ``weight`` in place for a width change ``d -> d_new`` (what :meth:`rescale`
        does to the module's weight); return it. For weights that live outside a module, e.g. streamed
        from a checkpoint tensor by tensor.

        Example:
            >>> RmsNormSpec("eps").scale_weight(torch.ones(2), 4, 1).tolist()
            [2.0, 2.0]
        """
        if d_new != d:
            with torch.no_grad():
                self._scale_(weight, d / d_new)
        return weight

    def rescale(self, module: nn.Module, d: int, d_new: int) -> None:
        """Make ``module`` over ``d_new`` channels equal the same norm over ``d`` with zeros added.

        ``x / sqrt(S/d + eps) == sqrt(d/d') x / sqrt(S/d' + eps d/d')``: multiply the effective weight
        by ``sqrt(d/d')`` and epsilon by ``d/d'``.
        """
        if d_new == d:
            return
        ratio = d / d_new
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise GraphError(
                f"norm {type(module).__name__} has no weight to absorb the width change {d} -> {d_new}; "
                "mark its space unprunable"
            )
        self.scale_weight(w, d, d_new)
        eps = getattr(module, self.eps_attr)
        if eps is None:  # nn.RMSNorm(eps=None) uses the dtype's machine epsilon
            eps = torch.finfo(w.dtype).eps
        setattr(module, self.eps_attr, float(eps) * ratio)
