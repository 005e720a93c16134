"""The ``recover-dynamic`` pass: multi-source LoRA recovery with degradation-driven sampling.

LoRAShear's Algorithm 5 (§3.5) made concrete. The pruned model (erased or not) is fine-tuned
through LoRA in *rounds*, on the pretraining sources (``stages=pretrain``, the default), then, with
``stages="pretrain,instruct"`` as in the paper, on instructions; before every
pretraining round the mixture of sources is rebuilt from how far each source still is from the
dense model. Each choice below fills a gap the paper leaves open:

1. **Validation** (Alg. 5 line 2): per-source perplexity on ``TextData.validation``
   (:meth:`~shear.data.TextData.perplexity`: the first ``eval_windows`` non-overlapping windows of
   ``seq_len`` tokens, every token scored), and for instructions the mean response-token NLL on
   ``TextData.instructions_val`` (:func:`~shear.kernels.recovery.instruction_loss`). Fixed windows,
   so that rounds compare on the same tokens.
2. **Dense reference**: ``ctx.dense`` (``shear.compile`` stores the caller's untouched model
   there) is measured once, with the same windows, and cached as a :class:`DensePerplexity`;
   without a dense model, precomputed per-source perplexities (``ctx.put(DensePerplexity(...))``)
   are used; the pass requires one of the two (the pass manager's error says how to give one).
   An instruct-only run (``stages=instruct``) needs no dense reference.
3. **Degradation** of source ``s``: ``d_s = log(ppl_pruned_s) - log(ppl_dense_s)``, the excess
   next-token loss in nats (a ratio of perplexities, so sources with very different dense
   perplexities compare; 0 = as good as dense).
4. **Mixture** ("dynamically construct D̂ by evaluation", line 5): source ``s`` is sampled with
   probability ``w_s = floor / S + (1 - floor) * softmax(d / temperature)_s``
   (:func:`~shear.kernels.recovery.source_weights`; ``mixture=proportional`` uses ``max(d, 0)``
   normalised instead). The paper asks to prioritise the most degraded sources *while ensuring a
   balanced representation of the least degraded ones to prevent overfitting*; the floor is that
   balance. ``floor=0.5`` gives every source at least half its uniform share, so no source is ever
   starved (it keeps being rehearsed and is not forgotten), and the other half goes to where the
   gap is. Softmax rather than proportional by default: equal degradations give a uniform mixture
   whatever their size, and measurement noise of a few hundredths of a nat cannot swing the
   mixture once sources are nearly recovered (with proportional weights, tiny noisy gaps decide).
   ``temperature=0.25`` nats: a source 0.25 nat (28% in ppl) more degraded than another gets ``e``
   times its dynamic share. Rows are drawn from one :class:`~shear.training.TokenBatches`
   stream kept across rounds (``set_weights`` per round), so data positions continue.
5. **Fine-tune** (line 6): ``steps_per_round`` steps of the shared loop
   (:func:`~shear.training.train`), LoRA adapters only, a fresh AdamW per round (the round's
   mixture is a new problem; the moments of the last one point elsewhere), seed ``seed + round``.
   Without adapters in the model the pass adds them (``lora_r``) and says so; it never merges them
   (``merge-lora`` does, later in the pipeline).
6. **Convergence** (line 4): the stage metric ``m`` is a log-perplexity (the mean validation log-ppl
   over the sources; the instruction validation loss), and a round's ``gain`` is the share by which
   its perplexity fell, ``1 - exp(m_after - m_before)``. The stage spends its budget (``max_rounds``)
   unless validation perplexity stops improving: ``patience`` rounds in a row each less than
   ``min_gain`` below the last round that improved (:class:`~shear.kernels.recovery.Patience`; small
   gains add up). One small gain while far from dense does not stop it. With ``keep_best`` (default)
   a round that made ``m`` worse is undone (the adapters go back to their values before it; its
   steps still count), so recovery never returns a worse model than it got. Without validation text
   the pretraining stage trains every round on a uniform mixture. :attr:`RecoveryResult.stopped` says
   which rule ended each stage: ``budget spent``, ``patience: ...`` or ``no validation data``.
7. **Instructions** (the second pass of line 3's loop): when ``TextData.instructions`` is not
   empty, rounds of :class:`~shear.training.InstructionBatches` (loss on the response only)
   with the same stopping rule. The records carry no source names, so there is no mixture to
   build; every example is drawn once per epoch. ``stages=instruct`` is the paper's † ablation
   (instruction data only).

The budget is ``stages x max_rounds x steps_per_round`` steps at most; :class:`RecoveryResult` has
the steps and tokens actually trained (``.steps``, ``.tokens``) so methods compare at equal budget,
a Markdown ``.table()``, and a figure (mixture per round as stacked bars, per-source ppl as lines)
written as PNG and SVG to ``out_dir``, or to ``ctx.options.dump_dir`` when a caller set one.

Example:
    >>> RecoverDynamic(max_rounds=3, steps_per_round=100).name  # "recover-dynamic{max_rounds=3,steps_per_round=100}"
    'recover-dynamic'
    >>> small = shear.compile(model, "discover-groups,random{ratio=0.3},erase,recover-dynamic", data=data)  # doctest: +SKIP
    >>> print(small.shear_report)                                                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from shear.data.text import TextData, require_text_data
from shear.errors import DataError, KernelError, PipelineError
from shear.figures import plot_recovery
from shear.kernels.recovery import (
    check_weight_options,
    mean_log,
)
from shear.passes.base import (
    Context,
    Key,
    OneOf,
    Pass,
    PassResult,
    missing_error,
    register_pass,
)
from shear.passes.finetune.ebft import RequiresTeacher
from shear.passes.lorashear.recovery_results import (
    DENSE_REFERENCE,
    DensePerplexity,
    RecoveryResult,
    RecoveryRound,
    Stage,
)
from shear.passes.lorashear.recovery_rounds import RecoveryRun, optional_dense, sources_of
from shear.training.distill import check_distill_options

__all__ = ["RecoverDynamic", "RecoveryResult", "RecoveryRound", "DensePerplexity"]



class _Requires:
    """``requires`` of :class:`RecoverDynamic`: a dense reference when a pretraining stage runs, and
    the teacher when distilling."""

    def __init__(self) -> None:
        self.teacher = RequiresTeacher(when="distill")

    def __get__(self, obj: RecoverDynamic | None, owner: type) -> tuple[Key | OneOf, ...]:
        if obj is None:
            return (DENSE_REFERENCE,)
        reference = (DENSE_REFERENCE,) if "pretrain" in obj.stage_list else ()
        return (*reference, *self.teacher.__get__(obj, owner))


class _Ensures:
    """``ensures`` of :class:`RecoverDynamic`: its result, and the dense perplexity a pretraining stage uses."""

    def __get__(self, obj: RecoverDynamic | None, owner: type) -> tuple[type, ...]:
        if obj is None or "pretrain" in obj.stage_list:
            return (RecoveryResult, DensePerplexity)
        return (RecoveryResult,)


@register_pass
@dataclass(frozen=True)
class RecoverDynamic(Pass):
    """Recover a pruned model with LoRA: pretraining sources weighted by their degradation, then instructions."""

    name: ClassVar[str] = "recover-dynamic"
    requires: ClassVar[tuple[Key | OneOf, ...]] = _Requires()  # type: ignore[assignment]
    ensures: ClassVar[tuple[type, ...]] = _Ensures()  # type: ignore[assignment]
    restructures: ClassVar[bool] = True

    stages: Literal["pretrain,instruct", "pretrain+instruct", "pretrain", "instruct"] = "pretrain"
    """Which datasets to recover on, in order. ``pretrain,instruct`` is the paper's recovery, ``instruct``
    alone its instruction-only ablation (in a pipeline string quote it,
    ``recover-dynamic{stages="pretrain,instruct"}``, or write ``pretrain+instruct``). The default is
    the pretraining sources alone: at an equal token budget they recover more (docs/results/ablation.md)."""
    instructions: bool = True
    """Run the instruction stage when ``stages`` names it and the data has instructions."""
    max_rounds: int = 5
    """Most rounds per stage."""
    steps_per_round: int = 50
    """Optimizer steps per round (the mixture is rebuilt between rounds)."""
    min_gain: float = 0.005
    """A round improves when it lowers the stage's validation perplexity by at least this share (from
    the last round that improved)."""
    patience: int = 2
    """A stage stops early after this many rounds in a row that did not improve (else it spends its budget)."""
    keep_best: bool = True
    """Undo a round that made the stage metric worse."""
    floor: float = 0.5
    """Share of the training rows spread uniformly: each of S sources gets at least floor/S."""
    temperature: float = 0.25
    """Softmax temperature over the degradations, in nats (lower: more to the most degraded source)."""
    mixture: Literal["softmax", "proportional"] = "softmax"
    """How the rest of the rows follow the degradations: softmax(d / temperature), or proportional to max(d, 0)."""
    lr: float = 2e-4
    """AdamW learning rate of the LoRA adapters."""
    batch_size: int = 4
    """Rows (sequences or instruction examples) per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 256
    """Tokens per training row and per validation window."""
    eval_windows: int | None = 8
    """Validation windows per source per evaluation (None: all)."""
    eval_batch_size: int = 8
    """Windows or instruction examples per forward pass when evaluating."""
    lora_r: int = 8
    """Rank of the LoRA adapters added when the model has none."""
    seed: int = 0
    """Seeds the data streams; round ``k`` trains with ``seed + k``."""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass to save memory; ``auto``: when a step's predicted
    activations exceed half the memory available on the model's device (``TrainConfig``)."""
    checkpoint_dir: str = ""
    """Write resumable checkpoints under ``<dir>/<stage>-<round>/`` (and resume from them); empty: none."""
    checkpoint_every: int = 0
    """Checkpoint every this many steps within a round (and at its end); needs checkpoint_dir."""
    out_dir: Path | None = None
    """Where the figure goes (PNG and SVG); default ``ctx.options.dump_dir``, else no figure."""

    distill: float = 0.0
    """Weight of the logit KL to the dense teacher, as in ``lhspg`` (0: labels only)."""
    distill_temperature: float = 1.0
    """Temperature of the distillation softmaxes."""
    teacher: str = "dense-model"
    """The dense teacher: ``dense-model`` is ``ctx.dense``, another name an analysis stored under it."""

    def __post_init__(self) -> None:
        check_distill_options(self.name, self.distill, self.distill_temperature)
        for opt in ("max_rounds", "steps_per_round", "batch_size", "grad_accum", "eval_batch_size", "lora_r", "patience"):
            value = getattr(self, opt)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineError(f"recover-dynamic: {opt} must be an int >= 1, got {value!r}")
        if self.seq_len < 2:
            raise PipelineError(f"recover-dynamic: seq_len must be >= 2, got {self.seq_len}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise PipelineError(f"recover-dynamic: eval_windows must be >= 1 or None, got {self.eval_windows}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PipelineError(f"recover-dynamic: lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.min_gain) and self.min_gain >= 0):
            raise PipelineError(
                f"recover-dynamic: min_gain must be >= 0 (a fraction, e.g. 0.005), got {self.min_gain}"
            )
        if self.seed < 0:
            raise PipelineError(f"recover-dynamic: seed must be >= 0, got {self.seed}")
        if self.checkpoint_every < 0 or (self.checkpoint_every > 0 and not self.checkpoint_dir):
            raise PipelineError(
                f"recover-dynamic: checkpoint_every={self.checkpoint_every} needs checkpoint_dir (and must be >= 0)"
            )
        try:
            check_weight_options(self.floor, self.temperature, self.mixture)
        except KernelError as e:
            raise PipelineError(f"recover-dynamic: {e}") from None

    @property
    def stage_list(self) -> tuple[Stage, ...]:
        named = self.stages.replace("+", ",").split(",")
        return tuple(s for s in ("pretrain", "instruct") if s in named)  # type: ignore[misc]

    # -- the pass ---------------------------------------------------------------------------------

    def run(self, ctx: Context) -> PassResult:
        start = time.perf_counter()
        data = require_text_data(ctx, self.name)
        stages = self._plan(ctx, data)
        if "pretrain" in stages:
            sources = sources_of(ctx, data)
        else:  # instruct only: per-source ppl is still tracked where there is validation text
            sources = [s for s in data.train if s in data.validation]
        dense = self._dense_ppl(ctx, data, sources) if "pretrain" in stages else optional_dense(ctx, sources)
        added = self._add_lora(ctx)
        run = RecoveryRun(self, ctx, data, sources, dense)
        total = len(stages) * self.max_rounds * self.steps_per_round
        with ctx.progress(total=total, description="recover-dynamic") as bar:
            run.bar = bar
            if "instruct" in stages:
                run.require_instructions()
            run.initial()
            for stage in stages:
                run.stage(stage)
        result = run.result(time.perf_counter() - start)
        out_dir = self.out_dir if self.out_dir is not None else ctx.options.dump_dir
        note = ""
        if out_dir is not None and result.initial.ppl:
            figures = plot_recovery(
                [(_label(r), r.weights, r.ppl) for r in result.rounds], result.dense_ppl, Path(out_dir) / "recover-dynamic"
            )
            result = RecoveryResult(**{**result.__dict__, "figures": tuple(figures)})
        elif out_dir is None:
            note = "; no figure (set out_dir or compile(dump_dir=...))"
        ctx.put(result)
        return PassResult(
            changed=result.steps > 0, message=_message(result) + note, stats=_stats(result), preserves_graph=not added
        )

    def _plan(self, ctx: Context, data: TextData) -> list[Stage]:
        stages = list(self.stage_list)
        if "instruct" in stages and not (self.instructions and data.instructions):
            why = "instructions=false" if not self.instructions else "ctx.data has no instructions"
            if stages == ["instruct"]:
                raise DataError(
                    f"recover-dynamic: stages=instruct but {why}; build the data with "
                    "TextData.from_corpus(tokenizer, instructions=N), or use stages=pretrain"
                )
            stages.remove("instruct")
            ctx.warn(f"recover-dynamic: skipped the instruction stage ({why})")
        if "instruct" in stages and not data.instructions_val:
            raise DataError(
                "recover-dynamic: the instruction stage measures convergence on TextData.instructions_val, "
                "which is empty; give held-out instructions (TextData.from_corpus(..., instructions=N) does)"
            )
        return stages

    def _dense_ppl(self, ctx: Context, data: TextData, sources: list[str]) -> dict[str, float]:
        """The dense per-source perplexity, measured once on the same windows (and cached as DensePerplexity)."""
        if not sources:  # no validation text: nothing to measure against
            return {}
        settings = {"seq_len": self.seq_len, "eval_windows": self.eval_windows}
        cached = ctx.find(DensePerplexity)
        model = ctx.dense
        reusable = model is None or getattr(cached, "settings", None) == settings
        if cached is not None and reusable:
            if not isinstance(cached, Mapping):
                raise PipelineError(
                    f"the dense perplexity must map source -> perplexity, got {type(cached).__name__}"
                )
            missing = [s for s in sources if s not in cached]
            if not missing:
                return {s: float(cached[s]) for s in sources}
            if model is None:
                raise PipelineError(
                    f"recover-dynamic: the dense perplexity lacks sources {missing}; give all of {sources}"
                )
        if model is None:
            raise missing_error(DENSE_REFERENCE, self.name)
        if not isinstance(model, nn.Module):
            raise PipelineError(f"ctx.dense must be the dense nn.Module, got {type(model).__name__}")
        if model is ctx.model:
            raise PipelineError(
                "ctx.dense is the model being recovered, not a dense copy; store the model "
                "from before pruning (e.g. 'keep-dense' first in the pipeline)"
            )
        ppl = data.perplexity(
            model, seq_len=self.seq_len, max_windows=self.eval_windows, sources=sources, batch_size=self.eval_batch_size
        )
        ctx.put(DensePerplexity(ppl, settings=settings))
        return ppl

    def _add_lora(self, ctx: Context) -> bool:
        """Wrap the model in LoRA when it has no adapters; whether it did (the graph is then stale)."""
        from shear.training import ensure_lora

        ctx.model, message = ensure_lora(ctx.model, r=self.lora_r)
        if message:
            ctx.warn(f"recover-dynamic: the model had no LoRA adapters; {message} (merge-lora folds them away)")
        return message is not None


def _label(r: RecoveryRound) -> str:
    return "before" if r.stage == "initial" else f"{r.stage[0]}{r.index}" + ("*" if r.restored else "")


def _message(r: RecoveryResult) -> str:
    parts = []
    first, last = r.initial, r._last_kept()
    if first.ppl:
        dense = f" (dense {math.exp(mean_log(r.dense_ppl)):.2f})" if r.dense_ppl else ""
        parts.append(f"ppl {first.mean_ppl:.2f} -> {last.mean_ppl:.2f}{dense}")
    if first.instruction_loss is not None and r.final_instruction_loss is not None:
        parts.append(f"instruction loss {first.instruction_loss:.3f} -> {r.final_instruction_loss:.3f}")
    rounds = ", ".join(f"{len(r.rounds_of(s))} {s} rounds ({why})" for s, why in r.stopped.items())
    return f"{'; '.join(parts) or 'trained unmeasured'} after {rounds}: {r.steps} steps, {r.tokens:,} tokens"


def _stats(r: RecoveryResult) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "steps": r.steps, "tokens": r.tokens, "rounds": len(r.rounds) - 1, "stopped": dict(r.stopped), "table": r.table(),
    }
    if r.initial.ppl:
        stats["ppl_before"] = r.initial.mean_ppl
        stats["ppl_after"] = r._last_kept().mean_ppl
    if r.final_instruction_loss is not None:
        stats["instruction_loss_before"] = r.initial.instruction_loss
        stats["instruction_loss_after"] = r.final_instruction_loss
    return stats
