"""The ``lhspg`` pass: progressive structured pruning over LoRA (LoRAShear Algorithm 4, §3.3).

LoRA trains while redundant structures are projected onto zero, so their knowledge moves into the
structures that stay. The schedule, on one run of the shared training loop
(:func:`shear.training.train`):

1. **Warm-up** (``warmup`` steps, none by default): LoRA only, W frozen.
2. **Periods** (``periods`` x ``steps_per_period``). Before each period the structures of the
   eligible groups are scored (:mod:`shear.kernels.saliency` on the current effective weights
   ``W + s * B @ A``); the lowest-scored important structures move to the redundant set until
   each group holds ``round(n_g * (p + 1) / periods)`` of its final count ``n_g``. The counts come
   from :class:`~shear.kernels.allocation.ParamBudget`, so the erased model loses ``ratio`` of the
   parameters (within ``tolerance``), not just a share of the structures.
3. **Each step** after the optimizer updated A and B: a redundant structure of the current period
   becomes ``(1 - lambda_t) * (x_g + s * (B A)_g)`` with ``lambda_t = 1 / (Tp - t)`` and a
   half-space projection (:class:`~shear.kernels.lhspg.StructureViews`), its lora_B rows reset;
   earlier redundant structures are held at exactly zero. Important structures are not touched.
4. **Period end**: every structure of the period is exactly zero; ``B @ A`` is merged into W for
   all layers (only important rows carry it: redundant B rows are zero) and the adapters restart
   (A re-drawn, B zero, their AdamW moments dropped).

Where this differs from a literal reading of the update (docs/lorashear.md): the decay multiplies the *merged* iterate, so the
last step of a period gives exactly zero even when ``B A`` is not zero (``x + sBA - lambda x`` is not
zero at ``lambda = 1``); the half-space test compares with the base slice, the structure's value
before the step. The group counts are a parameter budget, not a share of groups.

The pass requires the ``lora`` pass's :class:`~shear.passes.core.lora.LoraState`: in a pipeline without
``lora`` the pass manager runs ``lora{r=lora_r}`` first (it says so when it adds adapters) and traces
again; knowledge-distribution's unprunable groups are carried over to the new graph by name.
``erase`` then removes the zero structures; ``merge-lora`` folds the adapters away.

Example:
    >>> LHSPG(ratio=0.2, periods=4, steps_per_period=25).name   # "lhspg{ratio=0.2,periods=4,steps_per_period=25}"
    'lhspg'
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from shear.data.text import TextData, require_text_data
from shear.errors import PipelineError
from shear.graph.groups import GROUP_KINDS
from shear.graph.ir import Graph
from shear.kernels.allocation import ParamBudget
from shear.kernels.lhspg import StructureViews
from shear.kernels.saliency import compute_saliency, parse_weights
from shear.model.facts import strip_peft_prefix
from shear.model.target import layout_selection, round_steps
from shear.passes.base import Context, Key, Pass, PassResult, register_analysis, register_pass
from shear.passes.core.lora import AddLora, LoraState
from shear.passes.finetune.ebft import RequiresTeacher, dense_teacher
from shear.passes.lorashear.knowledge import KnowledgeDistribution
from shear.passes.lorashear.lhspg_blocks import check_block_kinds, depth_plan
from shear.training.distill import DistillLoss, check_distill_options
from shear.training.hooks import TrainHook

__all__ = [
    "LHSPG",
    "LhspgHook",
    "LhspgResult",
    "distill_loss",
    "eligible_groups",
    "saliency_calibration",
    "saliency_scorer",
]


@dataclass
class LhspgResult:
    """What LHSPG did: final counts, the zero structures, losses and the per-period record."""

    counts: dict[int, int]
    """Group id -> structures removed."""
    zeroed: dict[int, list[int]]
    """Group id -> indices of the structures that are exactly zero at the end."""
    target: float
    predicted_reduction: float
    params_before: int
    params_after: int
    losses: list[float] = field(default_factory=list)
    periods: list[dict[str, Any]] = field(default_factory=list)
    projected: int = 0
    """Structures the half-space projection zeroed before their period ended."""
    wall_s: float = 0.0
    train: Any = None
    """The :class:`~shear.training.TrainResult` of the run."""


class LhspgHook(TrainHook):
    """The training hook that runs LHSPG's schedule; its state checkpoints and resumes exactly."""

    def __init__(
        self,
        views: StructureViews,
        counts: dict[int, int],
        *,
        warmup: int,
        periods: int,
        steps_per_period: int,
        eps: float,
        score: Any,
        initial_scores: dict[int, torch.Tensor] | None = None,
        pools: Sequence[Sequence[int]] = (),
    ) -> None:
        self.views = views
        self.counts = counts
        self.warmup = warmup
        self.periods = periods
        self.tp = steps_per_period
        self.eps = eps
        self.score = score
        """Callable ``(model) -> dict[group id, Tensor[size]]``: saliency of every structure now."""
        self.initial_scores = initial_scores
        """Scores of the weights before training (the first period reuses them when warmup is 0)."""
        self.pools = [list(p) for p in pools]
        """Groups of one structure (decoder blocks) removed as one set: ``round(len(pool) * (p + 1) / P)``
        of a pool are redundant by period ``p``, the lowest-scored first."""
        self.period = -1
        self.decaying: dict[int, torch.Tensor] = {}
        self.held: dict[int, torch.Tensor] = {}
        """Group id -> bool mask over ``decaying[gid]``, on the weights' device: structures the
        half-space projection zeroed this period (folded into ``zeroed`` at the period's end, so the
        per-step work reads nothing back to the host)."""
        self.zeroed: dict[int, torch.Tensor] = {g: torch.zeros(0, dtype=torch.long) for g in counts}
        self.history: list[dict[str, Any]] = []
        self.projected = 0

    # -- schedule ---------------------------------------------------------------------------------

    def _select(self, state: Any, period: int, scores: dict[int, torch.Tensor] | None = None) -> None:
        if scores is None:
            with _whole_model(state) as model:  # FSDP2: scored on the gathered weights
                scores = self.score(model)
        decaying: dict[int, torch.Tensor] = {}
        moved = 0
        pooled = {g for pool in self.pools for g in pool}
        for pool in self.pools:
            want = round(len(pool) * (period + 1) / self.periods) - sum(1 for g in pool if self.zeroed[g].numel())
            left = sorted((g for g in pool if not self.zeroed[g].numel()), key=lambda g: float(scores[g].sum()))
            for gid in left[: max(want, 0)]:
                decaying[gid] = torch.zeros(1, dtype=torch.long)
                moved += 1
        for gid, n_final in self.counts.items():
            if gid in pooled:
                continue
            want = round(n_final * (period + 1) / self.periods)
            have = int(self.zeroed[gid].numel())
            new = max(want - have, 0)
            if new == 0:
                continue
            s = scores[gid].detach().float().cpu().clone()
            s[self.zeroed[gid]] = float("inf")
            decaying[gid] = s.argsort()[:new].sort().values
            moved += new
        self.decaying = decaying
        self.held = {}
        self.period = period
        self.history.append({"period": period, "moved": moved})

    def _merge(self, state: Any) -> None:
        from shear.training import merge_and_reset_lora
        from shear.training.optim import reset_optimizer_state

        gen = torch.Generator().manual_seed(1000 + self.period)
        merge_and_reset_lora(state.model, generator=gen)
        reset_optimizer_state(state.optimizer, [p for _, p in state.trainable])

    def on_train_start(self, state: Any) -> None:
        self.views.bind(state.model)  # the sharded copy under FSDP2
        if self.period < 0 and self.warmup == 0 and state.step == 0:
            self._select(state, 0, self.initial_scores)

    def after_optimizer_step(self, state: Any) -> None:
        s = state.step
        if s <= self.warmup:
            self.views.hold_zero(self.zeroed, state.optimizer)
            if s == self.warmup:
                self._select(state, 0)
            return
        k = s - self.warmup - 1
        period, t = divmod(k, self.tp)
        if period >= self.periods:
            self.views.hold_zero(self.zeroed, state.optimizer)
            return
        lam = 1.0 / (self.tp - t)
        self.views.decay(self.decaying, lam, eps=self.eps, optimizer=state.optimizer, held=self.held)
        self.views.hold_zero(self.zeroed, state.optimizer)
        if t == self.tp - 1:
            self.projected += sum(int(m.sum()) for m in self.held.values())
            for gid, idx in self.decaying.items():
                self.zeroed[gid] = torch.cat([self.zeroed[gid], idx]).unique()
            self.decaying, self.held = {}, {}
            self.history[-1]["loss"] = float(state.losses[-1]) if state.losses else float("nan")
            self.history[-1]["zero"] = sum(int(v.numel()) for v in self.zeroed.values())
            self._merge(state)
            if period + 1 < self.periods:
                self._select(state, period + 1)

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # structures projected this period are saved as zeroed (as they would be held after a resume)
        decaying, zeroed, projected = dict(self.decaying), dict(self.zeroed), self.projected
        for gid, mask in self.held.items():
            hit = mask.cpu()
            if bool(hit.any()):
                zeroed[gid] = torch.cat([zeroed[gid], decaying[gid][hit]]).unique()
                decaying[gid] = decaying[gid][~hit]
                projected += int(hit.sum())
        return {
            "period": self.period,
            "decaying": {str(g): v.clone() for g, v in decaying.items()},
            "zeroed": {str(g): v.clone() for g, v in zeroed.items()},
            "history": [dict(h) for h in self.history],
            "projected": projected,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.period = int(state["period"])
        self.decaying = {int(g): v.long() for g, v in state["decaying"].items()}
        self.zeroed = {int(g): v.long() for g, v in state["zeroed"].items()}
        self.history = [dict(h) for h in state["history"]]
        self.projected = int(state["projected"])
        self.held = {}


register_analysis("lhspg", LhspgResult)


@register_pass
@dataclass(frozen=True)
class LHSPG(Pass):
    """Progressive structured pruning over LoRA: redundant structures to exactly zero, knowledge kept."""

    name: ClassVar[str] = "lhspg"
    prunes: ClassVar[bool] = True
    requires: ClassVar[tuple[Key, ...]] = RequiresTeacher(Graph, LoraState, when="distill")  # type: ignore[assignment]
    ensures: ClassVar[tuple[type, ...]] = (LhspgResult,)

    ratio: float = 0.2
    """Fraction of the model's parameters (tied once, adapters not counted) the erased model loses."""
    periods: int = 5
    """Pruning periods P; each moves 1/P of the final count of every group to the redundant set."""
    steps_per_period: int = 10
    """Optimizer steps per period Tp; redundant structures reach exactly zero at its last step."""
    warmup: int = 0
    """LoRA-only steps before the first period (the paper has them; at an equal token budget they
    do more as recovery steps on the final structure: docs/results/ablation.md)."""
    lr: float = 2e-4
    """AdamW learning rate of the LoRA adapters."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    """Tokens per training sequence."""
    eps: float = 0.0
    """Half-space threshold: zero a decaying structure at once when <x_new, x> < eps * ||x||^2."""
    saliency: str = "activation=1"
    """Saliency weights ``criterion=weight`` (quote lists in a pipeline string:
    ``saliency="magnitude=1,activation=0.5"``); criteria as in the ``saliency`` pass. Wanda-style
    activation saliency by default: it kept the most quality of the criteria compared in
    docs/results/ablation.md."""
    calibration: int = 8
    """Calibration sequences for data-driven saliency criteria (activation, taylor)."""
    selection: str = "auto"
    """``uniform`` (same fraction of every group, topped up to the target), ``shared`` (same count in
    every layer: stock ``from_pretrained`` and vLLM load the result) or ``global``; ``auto``: from the
    run's target (``shared`` for ``hf``, else ``uniform``; ``nas`` also keeps kv-head counts equal
    across layers), ``uniform`` without one."""
    kinds: tuple[str, ...] = ("channel",)
    """Group kinds LHSPG may prune: MLP channels by default; ``kinds=[channel,head]`` adds attention
    heads (kv-head families), ``residual`` the hidden width, ``block`` whole attention/MLP branches and
    layers under the same budget (:mod:`shear.passes.lorashear.lhspg_blocks`). Heads are off by default: with few kv
    heads one family is a large share of a layer's attention, and pruning them cost quality at an
    equal token budget (docs/results/ablation.md)."""
    protect_cap: float = 1.5
    """How much wider than the others knowledge-distribution's protected groups may stay, as a multiple
    of the share of structures the other groups keep (``uniform`` selection only): they keep all of
    theirs while the others keep two thirds or more, and 1.5 times the others' share past that, so at
    high ratios they give up structures instead of the others being cut ever deeper; ``inf`` keeps
    them whole (the paper; at high ratios whole protection leaves the other groups too little,
    docs/results/ablation.md)."""
    round_to: int = 0
    """Keep multiples of this many structures in groups at least that large (8 for fast kernels);
    0 = the run's target's granularity per group kind (:mod:`shear.model.target`; 1 without one)."""
    tolerance: float = 0.005
    """Allowed distance of the predicted parameter reduction from ``ratio``."""
    lora_r: int = 8
    """Rank of the LoRA adapters added when the model has none."""
    seed: int = 0
    """Seeds the training run, the batch stream and the calibration windows."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass to save memory; ``auto``: when a step's predicted
    activations exceed half the memory available on the model's device (``TrainConfig``)."""
    checkpoint_dir: str = ""
    """Write resumable checkpoints here (and resume from the latest one); empty disables them."""
    checkpoint_every: int = 0
    """Steps between checkpoints (with ``checkpoint_dir``); 0 disables them."""
    distill: float = 0.0
    """Weight of the logit KL to the dense teacher: the loss is ``(1 - distill) * CE + distill * T^2 * KL``
    (:class:`~shear.training.DistillLoss`); 0 trains on the labels only."""
    distill_temperature: float = 1.0
    """Temperature ``T`` of the distillation softmaxes."""
    teacher: str = "dense-model"
    """The dense teacher: ``dense-model`` is ``ctx.dense`` (``shear.compile`` stores the caller's model
    there), another name an analysis stored under that name."""

    def __post_init__(self) -> None:
        check_distill_options(self.name, self.distill, self.distill_temperature)
        if not 0.0 < self.ratio < 1.0:
            raise PipelineError(f"lhspg: ratio must be in (0, 1), got {self.ratio}; e.g. ratio=0.2 removes 20%")
        for opt in ("periods", "steps_per_period"):
            if getattr(self, opt) < 1:
                raise PipelineError(f"lhspg: {opt} must be at least 1, got {getattr(self, opt)}")
        if self.warmup < 0:
            raise PipelineError(f"lhspg: warmup must be >= 0, got {self.warmup}")
        if self.selection not in ("auto", "uniform", "shared", "global"):
            raise PipelineError(f"lhspg: selection must be 'auto', 'uniform', 'shared' or 'global', got {self.selection!r}")
        if self.round_to < 0:
            raise PipelineError(f"lhspg: round_to must be >= 0 (0: from the target), got {self.round_to}")
        if not self.protect_cap >= 1.0:
            raise PipelineError(f"lhspg: protect_cap must be at least 1 (or inf), got {self.protect_cap}; e.g. protect_cap=1.5")
        parse_weights(self.saliency)
        check_block_kinds(self.kinds)

    def provider(self, key: Key) -> Pass | None:
        """Missing adapters come from ``lora{r=lora_r}``."""
        return AddLora(r=self.lora_r) if key is LoraState else None

    @property
    def total_steps(self) -> int:
        return self.warmup + self.periods * self.steps_per_period

    def run(self, ctx: Context) -> PassResult:
        from shear.training import TokenBatches, TrainConfig, train
        from shear.training.fingerprint import options_of

        start = time.perf_counter()
        data = require_text_data(ctx, self.name)
        graph = ctx.get(Graph)
        depth = depth_plan(ctx, graph, self.kinds, data, self.calibration, self.seq_len, self.seed)  # kinds=[block]
        graph = depth.graph if depth is not None else graph
        selection, equal = layout_selection(ctx.options.target, self.selection)
        capped = selection == "uniform" and math.isfinite(self.protect_cap) or bool(set(equal) & set(self.kinds))
        eligible, protected = eligible_groups(ctx, graph, self.kinds, capped)
        tied = [g for g in protected if graph.pruning_groups[g].kind in equal]
        if tied:
            ctx.warn(f"lhspg: the target keeps {'/'.join(sorted(set(equal)))} counts equal in every layer, so the {len(tied)} "
                     "such groups knowledge-distribution protected are pruned like the others")
        budget = ParamBudget(ctx.model, graph.prunable_groups)
        views = StructureViews(ctx.model, [graph.pruning_groups[i] for i in eligible], graph.composites)
        weights = parse_weights(self.saliency)
        calib = saliency_calibration(data, self.calibration, self.seq_len, self.seed, weights)
        widths = [g for g in eligible if depth is None or g not in depth.branches]
        score = saliency_scorer(graph, widths, weights, calib) if widths else None
        if depth is not None:  # blocks scored by the loss increase when skipped
            score = depth.scorer(score)
        assert score is not None  # eligible_groups found some groups
        initial = score(ctx.model)
        steps = round_steps(ctx.options.target, graph.prunable_groups, self.round_to)
        counts = (depth.allocator(ctx, budget) if depth is not None else budget.counts)(
            self.ratio,
            initial,
            eligible=eligible,
            selection=selection,
            round_to=steps,
            tolerance=self.tolerance,
            protected=protected,
            protect_cap=self.protect_cap,
            equal=equal,
        )
        if budget.off_grid(counts, steps) and not isinstance(steps, int):
            ctx.warn(f"lhspg: whole width steps of the target cannot reach ratio {self.ratio:g} on this model, so "
                     f"{len(budget.off_grid(counts, steps))} groups keep widths off them; round_to=<the step> keeps them "
                     "on the steps and stays short of the ratio")
        hook = LhspgHook(
            views,
            {g: n for g, n in counts.items() if n > 0},
            warmup=self.warmup,
            periods=self.periods,
            steps_per_period=self.steps_per_period,
            eps=self.eps,
            score=score,
            initial_scores=initial,
            pools=depth.pools(counts) if depth is not None else (),
        )
        config = TrainConfig(
            steps=self.total_steps,
            lr=self.lr,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            seq_len=self.seq_len,
            seed=self.seed,
            gradient_checkpointing=self.gradient_checkpointing,
            checkpoint_dir=self.checkpoint_dir or None,
            checkpoint_every=self.checkpoint_every,
        )
        batches = TokenBatches(data.train, self.batch_size, self.seq_len, seed=self.seed)
        loss_fn = distill_loss(ctx, self.name, self.teacher, self.distill, self.distill_temperature)
        with ctx.progress(total=self.total_steps, description="lhspg") as bar:
            trained = train(
                ctx.model, batches, config, hooks=[hook], progress=bar, run_options=options_of(self), loss_fn=loss_fn
            )
        for w in getattr(trained, "warnings", []):
            ctx.warn(f"lhspg: {w}")
        zeroed = {g: sorted(int(i) for i in v) for g, v in hook.zeroed.items() if v.numel()}
        result = LhspgResult(
            counts=counts,
            zeroed=zeroed,
            target=self.ratio,
            predicted_reduction=budget.reduction(counts),
            params_before=budget.total,
            params_after=budget.params_after(counts),
            losses=list(trained.losses),
            periods=hook.history,
            projected=hook.projected,
            wall_s=time.perf_counter() - start,
            train=trained,
        )
        ctx.put(result)
        n = sum(len(v) for v in zeroed.values())
        return PassResult(
            changed=n > 0,
            message=(
                f"{n} structures in {len(zeroed)} groups are zero after {self.total_steps} steps: "
                f"{result.params_before:,} -> {result.params_after:,} parameters once erased "
                f"(-{result.predicted_reduction:.1%}, target {self.ratio:.0%}); loss "
                f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f}"
            ),
            stats={
                "structures": n,
                "reduction": result.predicted_reduction,
                "params_after": result.params_after,
                "projected": hook.projected,
                "loss_first": result.losses[0],
                "loss_last": result.losses[-1],
            },
        )


# -- helpers ----------------------------------------------------------------------------------------


def distill_loss(ctx: Context, owner: str, key: str, weight: float, temperature: float) -> DistillLoss | None:
    """The distillation loss against the dense teacher (the ``teacher`` option ``key``); ``None`` when
    ``weight`` is 0."""
    if weight <= 0:
        return None
    try:
        teacher = dense_teacher(ctx, key)
    except PipelineError as e:
        raise PipelineError(f"{owner}: distill={weight}: {e}") from None
    return DistillLoss(teacher, weight=weight, temperature=temperature)


def _whole_model(state: Any) -> Any:
    """``state.unsharded()`` (the whole weights under FSDP2), or the model itself for a plain state."""
    unsharded = getattr(state, "unsharded", None)
    return unsharded() if callable(unsharded) else nullcontext(state.model)


def _unprunable(ctx: Context, graph: Graph) -> frozenset[int]:
    """The groups of ``graph`` that knowledge-distribution marked unprunable, mapped by name (peft
    prefix stripped) when it measured on an older graph (``lora`` wrapped the model since)."""
    kd = ctx.find(KnowledgeDistribution)
    if kd is None:
        return frozenset()
    measured = ctx.basis(KnowledgeDistribution)
    if measured is None or measured is graph:
        return frozenset(kd.unprunable_groups)
    names = {strip_peft_prefix(measured.pruning_groups[i].name) for i in kd.unprunable_groups}
    return frozenset(g.id for g in graph.pruning_groups if strip_peft_prefix(g.name) in names)


def eligible_groups(ctx: Context, graph: Graph, kinds: tuple[str, ...], capped: bool) -> tuple[list[int], list[int]]:
    """The groups LHSPG may prune, and those of them knowledge-distribution protected: with ``capped``
    (a finite ``protect_cap``) the protected groups are eligible and listed again; else they are left out.

    Raises :class:`~shear.errors.PipelineError` for an unknown kind or when nothing is eligible."""
    unknown = set(kinds) - set(GROUP_KINDS)
    if unknown:
        raise PipelineError(f"lhspg: unknown group kinds {sorted(unknown)}; use {', '.join(GROUP_KINDS)}")
    blocked = _unprunable(ctx, graph)
    ids = [g.id for g in graph.prunable_groups if g.kind in kinds and g.id not in blocked]
    if not ids:
        raise PipelineError(
            f"lhspg: {type(ctx.model).__name__} has no prunable groups of kinds {list(kinds)} "
            f"({len(graph.prunable_groups)} prunable, {len(blocked)} marked unprunable by knowledge-distribution)"
        )
    protected = [g.id for g in graph.prunable_groups if g.kind in kinds and g.id in blocked] if capped else []
    return sorted(ids + protected), protected


_DATA_CRITERIA = ("activation", "taylor1", "taylor2")


def saliency_calibration(
    data: TextData, n: int, seq_len: int, seed: int, weights: dict[str, float]
) -> torch.Tensor | None:
    """The ``[n, seq_len]`` calibration windows LHSPG's saliency reads, or ``None`` when no criterion
    of ``weights`` needs data (norms only), so a weight-only saliency reads no text. Public so that
    tools measuring LHSPG's phases (``tools.bench_training_memory``) score exactly as the pass does."""
    if not any(weights.get(c, 0.0) for c in _DATA_CRITERIA):
        return None
    return data.calibration(n, seq_len, seed=seed)


def saliency_scorer(
    graph: Graph,
    eligible: list[int],
    weights: dict[str, float],
    calibration: torch.Tensor | None,
) -> Any:
    """``model -> {group id: scores}``: the weighted saliency criteria on the current weights.

    The one scorer LHSPG calls before every period; public so that a tool can measure the saliency
    phase on its own with the same criteria, groups and calibration as the pass."""
    groups = [graph.pruning_groups[i] for i in eligible]

    def score(model: torch.nn.Module) -> dict[int, torch.Tensor]:
        result = compute_saliency(
            model, groups, weights=weights, calibration_ids=calibration, composites=graph.composites
        )
        return {g.id: result.by_group[g.id] for g in groups}

    return score
