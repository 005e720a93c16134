"""The ``erase`` pass: turn zero structures into a smaller dense model (LoRAShear §3.4).

Every structure of every prunable pruning group whose primary slices (producer rows, bias, lora_B
rows) are all exactly zero is removed, and nothing else, no matter how the zeros were made (LHSPG,
a baseline, your own code). The two-pass traversal and the slicing live in
:mod:`shear.codegen.module_tree`; this pass runs it on ``ctx.model`` in place (the pass manager works
on its own copy unless ``compile(inplace=True)``), verifies the small model against the masked one on
``ctx.example_inputs``, and stores an :class:`~shear.codegen.module_tree.ErasureReport` in the context
(``ctx.get(ErasureReport)``). When it erased something the traced graph no longer describes the
model: the result says so (``preserves_graph=False``), the pass manager retires the graph
(``ctx.retired_graph("erase")``) and traces again for a later pass that needs it.

Example:
    >>> Erase().name, Erase(verify=False).verify       # pipeline string: "erase{verify=false}"
    ('erase', False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from shear.codegen.module_tree import EMIT_MODES, ErasureReport, codegen
from shear.errors import PipelineError
from shear.graph.ir import Graph
from shear.model.devices import TENSOR_CORE_MULTIPLE, model_device, untiled_linears
from shear.passes.base import Context, Pass, PassResult, register_analysis, register_pass
from shear.passes.options import require_number

__all__ = ["Erase"]

register_analysis("erase", ErasureReport)


@register_pass
@dataclass(frozen=True)
class Erase(Pass):
    """Remove every all-zero structure of the prunable groups; emit the smaller model."""

    name: ClassVar[str] = "erase"
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[type, ...]] = (ErasureReport,)
    restructures: ClassVar[bool] = True

    verify: bool = True
    """Compare the small model with the masked one on the example inputs (also off when
    ``ctx.options.verify`` is False: ``shear.compile(verify=False)``, ``shear prune --no-verify``).
    Without it, ``emit=auto`` cannot see that a sliced module tree fails to run: it slices the tree."""
    min_keep: int = 1
    """Structures each group keeps even when all are zero (a head-less attention cannot reshape)."""
    emit: str = "auto"
    """``auto``: slice the module tree (the model keeps its class), and emit a ``torch.fx``
    GraphModule instead when the sliced tree cannot run (a custom module hard-codes a pruned size);
    ``module``: the module tree or an error; ``graph``: always the GraphModule."""

    def __post_init__(self) -> None:
        require_number("erase", "min_keep", self.min_keep, integer=True, low=0)
        if self.emit not in EMIT_MODES:
            raise PipelineError(f"erase: emit must be one of {', '.join(EMIT_MODES)}, got {self.emit!r}")

    def run(self, ctx: Context) -> PassResult:
        graph = ctx.get(Graph)
        verify = self.verify and ctx.options.verify is not False
        small, report = codegen(
            ctx.model,
            graph.pruning_groups,
            example_inputs=ctx.example_inputs,
            verify=verify,
            inplace=True,
            min_keep=self.min_keep,
            emit=self.emit,
        )
        if report.fallback_reason:
            ctx.warn(f"erase: {report.fallback_reason}; emitted a torch.fx GraphModule instead (erase{{emit=graph}})")
        ctx.put(report)
        for msg in report.plan.messages:
            ctx.warn(f"erase: {msg}")
        if report.plan.empty:
            n = sum(1 for g in graph.pruning_groups if g.prunable)
            message = f"no zero structures in {n} prunable groups; nothing erased (run a pruning pass first)"
            ctx.warn(f"erase: {message}")
            return PassResult(changed=False, message=message, stats={"structures": 0})
        ctx.model = small
        if model_device(small).type == "cuda":
            target = ctx.options.target
            multiple = target.device_granularity if target is not None and target.device == "cuda" else TENSOR_CORE_MULTIPLE
            untiled = untiled_linears(small, max(multiple, 1)) if multiple > 1 else []
            if untiled:
                ctx.warn(
                    f"erase: {len(untiled)} Linear layers now have widths that are not multiples of "
                    f"{multiple} (e.g. {untiled[0]}); GPU matrix kernels can run such widths slower than the "
                    "dense model's (docs/gpus.md). Prune for the GPU with --target cuda (shear.compile(..., target='cuda'): "
                    "widths in the GPU's measured steps) and leave round_to unset, or give round_to=64"
                )
        removed = {g: int(v.numel()) for g, v in report.plan.removed.items() if v.numel()}
        return PassResult(
            changed=True,
            preserves_graph=False,
            message=report.summary(),
            stats={
                "structures": sum(removed.values()),
                "groups": len(removed),
                "params_before": report.params_before,
                "params_after": report.params_after,
                "max_diff": report.max_diff,
                "from_pretrained_compatible": report.from_pretrained_compatible,
                "emitted": report.emitted,
            },
        )
