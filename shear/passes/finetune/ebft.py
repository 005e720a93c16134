"""The ``ebft`` pass: block-wise reconstruction fine-tuning of a sparse or pruned decoder LLM (EBFT).

After pruning (unstructured, N:M, or structured and erased), each decoder block of the student is
tuned in order to reproduce the dense teacher's block output on calibration windows, with its
input taken from the already tuned student blocks before it (errors are corrected progressively).
Masks stay fixed: weights that were exactly zero when the pass started stay exactly zero (or the
keep masks of ``ctx.get(WeightMasks).masks`` when a sparsity pass left them), and erased
structures stay erased, since they are gone. The engine is :mod:`shear.kernels.ebft`.

The dense teacher is ``ctx.dense`` (the option ``teacher`` names another key), which the pass
requires: ``shear.compile`` stores the caller's untouched model there (it works on a copy unless
``inplace=True``); with ``inplace=True``, or when calling passes yourself, put a ``keep-dense``
pass before the pruning passes, or set ``Context(dense=...)`` yourself. Block outputs
are compared on the residual stream, so a structurally pruned student (narrower MLPs, fewer heads)
is fine; when ``erase`` also narrowed the residual stream, outputs compare on the residual channels
it kept (read from the ``erase`` report and the graph it erased; without them a narrower residual
is a PipelineError).

Data: ``ctx.data`` is a :class:`shear.data.TextData` (``nsamples`` windows of ``seq_len`` tokens are
drawn with ``seed``), or a ``[n, seq_len]`` long tensor of calibration ids used as is.

What it recovers on the reference models is in docs/results/ (EBFT rows), with the commands.

Example:
    >>> p = EBFT(nsamples=32, seq_len=256, lr=2e-4, epochs=5)   # "ebft{nsamples=32,lr=0.0002,epochs=5}"
    >>> p.name, p.train
    ('ebft', 'weights')
    >>> small = shear.compile(model, ["magnitude{mode=unstructured,ratio=0.5}", "ebft"], data=data)  # doctest: +SKIP
    >>> small.shear_report                      # per-block MSE before/after in the ebft record  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from shear.codegen.module_tree import ErasureReport
from shear.data.text import calibration_ids
from shear.errors import PipelineError
from shear.kernels.ebft import (
    BlockInputs,
    block_reconstruct,
    capture_block_inputs,
    decoder_blocks,
    infer_masks,
    run_block,
    trainable_parameters,
    unwrap_model,
)
from shear.kernels.sparsity import WeightMasks
from shear.model.devices import model_device
from shear.model.facts import is_lora_param
from shear.passes.base import DENSE, Context, Key, Pass, PassResult, register_analysis, register_pass

__all__ = [
    "EBFT",
    "KeepDense",
    "EBFTReport",
    "BlockRecord",
    "dense_teacher",
    "teacher_key",
    "RequiresTeacher",
    "explicit_masks",
    "kept_residual_channels",
]


@dataclass(frozen=True)
class BlockRecord:
    """One block's reconstruction error (MSE vs the teacher's block output) before and after tuning."""

    index: int
    mse_before: float
    mse_after: float
    steps: int
    restored: bool
    """Tuning made it worse, so the block's weights were put back."""


@dataclass
class EBFTReport:
    """What ``ebft`` did: per-block records and the error of the last block's output.

    ``output_mse_before`` is the last block's output error of the untuned student (each block fed
    by the untuned blocks before it), ``output_mse_after`` the same for the tuned student.
    """

    blocks: list[BlockRecord] = field(default_factory=list)
    output_mse_before: float = float("nan")
    output_mse_after: float = float("nan")
    samples: int = 0
    seq_len: int = 0

    def summary(self) -> str:
        return (
            f"tuned {len(self.blocks)} blocks on {self.samples}x{self.seq_len} tokens: output MSE "
            f"{self.output_mse_before:.4g} -> {self.output_mse_after:.4g}"
        )


register_analysis("ebft", EBFTReport)


def teacher_key(teacher: str) -> Key:
    """The context key of a ``teacher`` option: ``"dense-model"`` is ``ctx.dense``, another name a string key."""
    return DENSE if teacher == DENSE else teacher


class RequiresTeacher:
    """``requires`` of a pass with a ``teacher`` option: ``base`` plus the teacher's key, always or
    only when the option named ``when`` is positive (``distill``); on the class, ``base`` (plus the
    dense model when always needed).

    Example:
        >>> EBFT.requires, EBFT(teacher="my-teacher").requires
        (('dense-model',), ('my-teacher',))
    """

    def __init__(self, *base: Key, when: str | None = None) -> None:
        self.base, self.when = base, when

    def __get__(self, obj: Any, owner: type) -> tuple[Key, ...]:
        if obj is None:
            return self.base if self.when else (*self.base, DENSE)
        if self.when is not None and getattr(obj, self.when) <= 0:
            return self.base
        return (*self.base, teacher_key(obj.teacher))


def dense_teacher(ctx: Context, key: str = DENSE) -> nn.Module:
    """The dense teacher (``ctx.dense``, or the analysis named ``key``); the standard
    missing-prerequisite error when there is none, a PipelineError when it is not a dense copy."""
    teacher = ctx.get(teacher_key(key))
    if not isinstance(teacher, nn.Module):
        raise PipelineError(f"the dense teacher {key!r} must be the dense nn.Module, got {type(teacher).__name__}")
    if teacher is ctx.model or unwrap_model(teacher) is unwrap_model(ctx.model):
        raise PipelineError(
            f"the dense teacher {key!r} is the model being tuned, not a dense copy of it; store the model from "
            "before pruning (e.g. with 'keep-dense' first in the pipeline)"
        )
    return teacher


def explicit_masks(ctx: Context) -> Mapping[str, torch.Tensor] | None:
    """Keep masks a sparsity pass left in the context (anything with a ``.masks`` dict)."""
    masks = getattr(ctx.find(WeightMasks), "masks", None)
    return masks if isinstance(masks, Mapping) else None


def kept_residual_channels(ctx: Context, teacher_width: int, student_width: int) -> torch.Tensor:
    """Residual channels the erased student kept, from the ``erase`` report, as teacher indices.

    When structured pruning narrowed the residual stream, the small model's residual equals the
    masked model's on the kept channels (erasure rescales the norms), so block outputs compare on
    those channels. Raises PipelineError when the context cannot say which channels were kept.
    """
    graph = ctx.retired_graph("erase")
    plan = getattr(ctx.find(ErasureReport), "plan", None)
    removed = getattr(plan, "removed", None)
    groups = [g for g in getattr(graph, "pruning_groups", ()) if g.kind == "residual" and g.size == teacher_width]
    if isinstance(removed, Mapping) and len(groups) == 1:
        gone = removed.get(groups[0].id, torch.zeros(0, dtype=torch.long))
        keep = torch.ones(teacher_width, dtype=torch.bool)
        keep[gone] = False
        if int(keep.sum()) == student_width:
            return keep.nonzero().flatten()
    raise PipelineError(
        f"ebft: the pruned model's residual width is {student_width} and the dense model's {teacher_width}, "
        "and the context holds no erase report that says which residual channels were kept (run ebft in the "
        "same pipeline as 'erase'), so block outputs cannot be compared; or keep the residual stream unpruned"
    )


def _to(obj: Any, dev: torch.device) -> Any:
    """``obj`` with every tensor inside (lists, tuples, dicts) moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: _to(v, dev) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(_to(v, dev) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, dev) for v in obj)
    return obj


@torch.no_grad()
def _advance(block: nn.Module, xs: list[torch.Tensor], inputs: BlockInputs, i: int) -> list[torch.Tensor]:
    was_training = block.training
    block.eval()
    try:
        return [run_block(block, x, inputs.args[i][c], inputs.kwargs[i][c]).detach() for c, x in enumerate(xs)]
    finally:
        block.train(was_training)


def _mse(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    total = sum(float(((x.float() - y.to(x.device).float()) ** 2).sum()) for x, y in zip(a, b, strict=True))
    return total / max(sum(y.numel() for y in b), 1)


@register_pass
@dataclass(frozen=True)
class EBFT(Pass):
    """Tune every decoder block to reproduce the dense teacher's block output (masks fixed)."""

    name: ClassVar[str] = "ebft"
    requires: ClassVar[tuple[Key, ...]] = RequiresTeacher()  # type: ignore[assignment]
    ensures: ClassVar[tuple[type, ...]] = (EBFTReport,)

    nsamples: int = 32
    """Calibration windows (ignored when ``ctx.data`` is a tensor of ids)."""
    seq_len: int = 256
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the window choice and of the chunk order."""
    lr: float = 2e-4
    """Adam learning rate."""
    epochs: int = 5
    """Passes over the calibration windows per block."""
    batch_size: int = 4
    """Windows per optimisation step (and per forward chunk when capturing)."""
    train: Literal["weights", "lora"] = "weights"
    """Tune all of a block's weights, or only its LoRA adapters (base weights frozen)."""
    teacher: str = "dense-model"
    """The dense teacher: ``dense-model`` is ``ctx.dense``, another name an analysis stored under it."""


    def __post_init__(self) -> None:
        for opt in ("nsamples", "seq_len", "epochs", "batch_size"):
            if getattr(self, opt) <= 0:
                raise PipelineError(f"ebft: {opt} must be positive, got {getattr(self, opt)}")
        if not self.lr > 0:
            raise PipelineError(f"ebft: lr must be positive, got {self.lr}")
        if self.train not in ("weights", "lora"):
            raise PipelineError(f"ebft: train must be 'weights' or 'lora', got {self.train!r}")

    def run(self, ctx: Context) -> PassResult:
        student = ctx.model
        s_blocks = decoder_blocks(student)
        teacher = dense_teacher(ctx, self.teacher)
        t_blocks = decoder_blocks(teacher)
        if len(s_blocks) != len(t_blocks):
            raise PipelineError(
                f"ebft: the student has {len(s_blocks)} decoder blocks and the dense teacher {len(t_blocks)}; "
                "block-wise reconstruction pairs them one to one (was a whole block removed?)"
            )
        for b in s_blocks:
            trainable_parameters(b, self.train)  # fails early, naming the problem, for train='lora'
        ids = calibration_ids(ctx, self.name, self.nsamples, self.seq_len, self.seed)
        xs = capture_block_inputs(student, ids, batch_size=self.batch_size, blocks=s_blocks)
        xt = capture_block_inputs(teacher, ids, batch_size=self.batch_size, blocks=t_blocks)
        dev = model_device(student)
        if model_device(teacher) != dev:  # the caller's model stays where it is; its blocks visit as copies
            xt = BlockInputs(_to(xt.hidden, dev), _to(xt.args, dev), _to(xt.kwargs, dev))
        kept = None if xs.width == xt.width else kept_residual_channels(ctx, xt.width, xs.width)
        explicit = explicit_masks(ctx)
        names = {id(p): n for n, p in student.named_parameters()}
        report = EBFTReport(samples=int(ids.shape[0]), seq_len=int(ids.shape[1]))
        x_s, x_t, x_u = xs.hidden, xt.hidden, xs.hidden
        targets: list[torch.Tensor] = []
        revived_warned = False
        with ctx.progress(total=len(s_blocks), description="ebft") as bar:
            for i, (sb, tb) in enumerate(zip(s_blocks, t_blocks, strict=True)):
                x_t = _advance(tb if model_device(tb) == dev else copy.deepcopy(tb).to(dev), x_t, xt, i)
                targets = x_t if kept is None else [y.index_select(-1, kept.to(y.device)) for y in x_t]
                x_u = _advance(sb, x_u, xs, i)
                masks = infer_masks(sb, explicit, names=names)
                if self.train == "lora" and not revived_warned and any(
                    m is not None and not is_lora_param(n) for n, m in masks.items()
                ):
                    ctx.warn(
                        "ebft: train='lora' leaves the sparse base weights untouched, but the LoRA update is "
                        "dense: merging it revives pruned weights; use train='weights' to keep the sparsity"
                    )
                    revived_warned = True
                r = block_reconstruct(
                    sb,
                    targets,
                    x_s,
                    masks,
                    args=xs.args[i],
                    kwargs=xs.kwargs[i],
                    train=self.train,
                    lr=self.lr,
                    epochs=self.epochs,
                    seed=self.seed + i,
                )
                report.blocks.append(BlockRecord(i, r.mse_before, r.mse_after, r.steps, r.restored))
                x_s = _advance(sb, x_s, xs, i)
                bar.set_description(f"ebft block {i}: mse {r.mse_before:.3g} -> {r.mse_after:.3g}")
                bar.advance()
        report.output_mse_before = _mse(x_u, targets)
        report.output_mse_after = _mse(x_s, targets)
        ctx.put(report)
        restored = [b.index for b in report.blocks if b.restored]
        if restored:
            ctx.warn(f"ebft: tuning made blocks {restored} worse (lr {self.lr} too large?); their weights were kept")
        return PassResult(
            changed=any(not b.restored for b in report.blocks),
            message=report.summary(),
            stats={
                "blocks": [
                    {"block": b.index, "mse_before": b.mse_before, "mse_after": b.mse_after, "restored": b.restored}
                    for b in report.blocks
                ],
                "mse_before": sum(b.mse_before for b in report.blocks),
                "mse_after": sum(b.mse_after for b in report.blocks),
                "output_mse_before": report.output_mse_before,
                "output_mse_after": report.output_mse_after,
                "steps": sum(b.steps for b in report.blocks),
                "samples": report.samples,
                "seq_len": report.seq_len,
            },
        )


@register_pass
@dataclass(frozen=True)
class KeepDense(Pass):
    """Keep a copy of the model as it is now in ``ctx.dense``: ``ebft``'s teacher.

    Put it before the pruning passes when ``shear.compile(inplace=True)`` or a hand-run pass manager
    did not store the dense model; a dense model already there (``shear.compile``'s) is kept. The
    pass manager never inserts it by itself: a copy taken late in a pipeline is not the dense model.
    """

    name: ClassVar[str] = "keep-dense"
    ensures: ClassVar[tuple[str, ...]] = (DENSE,)
    auto_insert: ClassVar[bool] = False

    def run(self, ctx: Context) -> PassResult:
        if ctx.dense is not None:
            return PassResult(changed=False, message="ctx.dense already holds the dense model")
        ctx.dense = copy.deepcopy(ctx.model)
        n = sum(p.numel() for p in ctx.model.parameters())
        return PassResult(changed=False, message=f"kept a dense copy ({n} parameters) as 'dense-model'")
