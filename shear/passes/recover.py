"""The ``recover-dynamic`` pass: multi-source LoRA recovery with degradation-driven sampling.

LoRAShear's Algorithm 5 (§3.5) made concrete. The pruned model (erased or not) is fine-tuned
through LoRA in *rounds*, first on the pretraining sources, then on instructions; before every
pretraining round the mixture of sources is rebuilt from how far each source still is from the
dense model. Each choice below fills a gap the paper leaves open:

1. **Validation** (Alg. 5 line 2): per-source perplexity on ``TextData.validation``
   (:meth:`~shear.data.TextData.perplexity`: the first ``eval_windows`` non-overlapping windows of
   ``seq_len`` tokens, every token scored), and for instructions the mean response-token NLL on
   ``TextData.instructions_val`` (:func:`~shear.runtime.recovery.instruction_loss`). Fixed windows,
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
   (:func:`~shear.runtime.recovery.source_weights`; ``mixture=proportional`` uses ``max(d, 0)``
   normalised instead). The paper asks to prioritise the most degraded sources *while ensuring a
   balanced representation of the least degraded ones to prevent overfitting*; the floor is that
   balance. ``floor=0.5`` gives every source at least half its uniform share, so no source is ever
   starved (it keeps being rehearsed and is not forgotten), and the other half goes to where the
   gap is. Softmax rather than proportional by default: equal degradations give a uniform mixture
   whatever their size, and measurement noise of a few hundredths of a nat cannot swing the
   mixture once sources are nearly recovered (with proportional weights, tiny noisy gaps decide).
   ``temperature=0.25`` nats: a source 0.25 nat (28% in ppl) more degraded than another gets ``e``
   times its dynamic share. Rows are drawn from one :class:`~shear.runtime.training.TokenBatches`
   stream kept across rounds (``set_weights`` per round), so data positions continue.
5. **Fine-tune** (line 6): ``steps_per_round`` steps of the shared loop
   (:func:`~shear.runtime.training.train`), LoRA adapters only, a fresh AdamW per round (the round's
   mixture is a new problem; the moments of the last one point elsewhere), seed ``seed + round``.
   Without adapters in the model the pass adds them (``lora_r``) and says so; it never merges them
   (``merge-lora`` does, later in the pipeline).
6. **Convergence** (line 4): after a round, ``gain = (m_before - m_after) / m_before`` of the stage
   metric ``m`` (the mean validation log-ppl over the sources; the instruction validation loss);
   the stage stops when ``gain < min_gain`` or after ``max_rounds``. With ``keep_best`` (default) a
   round that made ``m`` worse is undone (the adapters go back to their values before it) and the
   stage stops, so recovery never returns a worse model than it got; its steps still count.
7. **Instructions** (the second pass of line 3's loop): when ``TextData.instructions`` is not
   empty, rounds of :class:`~shear.runtime.training.InstructionBatches` (loss on the response only)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from shear.data.text import TextData, require_text_data
from shear.errors import DataError, KernelError, PassError, PipelineError
from shear.passes.base import (
    DENSE,
    Context,
    Key,
    OneOf,
    Pass,
    PassResult,
    missing_error,
    register_analysis,
    register_pass,
)
from shear.passes.ebft import RequiresTeacher
from shear.runtime.hf_config import max_positions
from shear.runtime.recovery import (
    check_weight_options,
    degradation,
    instruction_loss,
    mean_log,
    plot_recovery,
    relative_gain,
    source_weights,
)
from shear.runtime.training.distill import check_distill_options

__all__ = ["RecoverDynamic", "RecoveryResult", "RecoveryRound", "DensePerplexity"]

Stage = Literal["pretrain", "instruct"]


@dataclass(frozen=True)
class RecoveryRound:
    """One evaluation point of a recovery run: the round's mixture, what it trained, and the metrics after it.

    Round 0 (``stage="initial"``) is the model as the pass got it: no mixture, no steps.
    """

    stage: str
    """``"initial"``, ``"pretrain"`` or ``"instruct"``."""
    index: int
    """Round number within its stage (1-based; 0 for the initial evaluation)."""
    weights: dict[str, float]
    """Source -> share of the round's training rows (empty for the initial and instruction rounds)."""
    ppl: dict[str, float]
    """Source -> validation perplexity measured after the round."""
    instruction_loss: float | None = None
    """Mean response-token NLL on ``instructions_val`` after the round (None without instructions)."""
    degradation: dict[str, float] = field(default_factory=dict)
    """Source -> ``log(ppl / ppl_dense)`` that chose ``weights`` (measured before the round)."""
    steps: int = 0
    tokens: int = 0
    """Input tokens trained in the round (padding excluded)."""
    loss: float = math.nan
    """Mean training loss over the round's steps."""
    gain: float = math.nan
    """Relative improvement of the stage metric over the round (negative: worse)."""
    restored: bool = False
    """The round made the stage metric worse and its adapter updates were undone (``keep_best``)."""

    def __post_init__(self) -> None:
        if self.weights and abs(sum(self.weights.values()) - 1.0) > 1e-6:
            raise PassError(f"round weights must sum to 1, got {self.weights}")

    @property
    def mean_ppl(self) -> float:
        """Geometric mean of the per-source perplexities (``exp`` of the mean log-ppl)."""
        return math.exp(mean_log(self.ppl)) if self.ppl else math.nan


@dataclass(frozen=True)
class RecoveryResult:
    """What ``recover-dynamic`` did: every round, the dense reference, the budget spent, the figure."""

    rounds: tuple[RecoveryRound, ...]
    dense_ppl: dict[str, float]
    """Source -> perplexity of the dense model (empty for an instruct-only run without a reference)."""
    dense_instruction_loss: float | None = None
    stopped: dict[str, str] = field(default_factory=dict)
    """Stage -> why it stopped: ``converged``, ``worse`` (a round was undone) or ``max_rounds``."""
    figures: tuple[Path, ...] = ()
    wall_s: float = 0.0

    @property
    def steps(self) -> int:
        """Optimizer steps trained over all rounds (the recovery budget spent)."""
        return sum(r.steps for r in self.rounds)

    @property
    def tokens(self) -> int:
        """Input tokens trained over all rounds."""
        return sum(r.tokens for r in self.rounds)

    @property
    def initial(self) -> RecoveryRound:
        return self.rounds[0]

    @property
    def final_ppl(self) -> dict[str, float]:
        """Per-source perplexity of the returned model (rounds that were undone do not count)."""
        return dict(self._last_kept().ppl)

    @property
    def final_instruction_loss(self) -> float | None:
        kept = [r for r in self.rounds if not r.restored and r.instruction_loss is not None]
        return kept[-1].instruction_loss if kept else None

    def _last_kept(self) -> RecoveryRound:
        return [r for r in self.rounds if not r.restored][-1]

    def rounds_of(self, stage: str) -> list[RecoveryRound]:
        return [r for r in self.rounds if r.stage == stage]

    def table(self) -> str:
        """Markdown: one row per round (mixture, perplexities, instruction loss, budget) and the dense row."""
        sources = list(self.rounds[0].ppl)
        has_instr = any(r.instruction_loss is not None for r in self.rounds)
        head = ["round", "stage", "steps", "tokens"] + [f"w {s}" for s in sources] + [f"ppl {s}" for s in sources]
        head += ["mean ppl"] + (["instr loss"] if has_instr else []) + ["gain"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

        def fmt(x: float | None, spec: str) -> str:
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

        for r in self.rounds:
            cells = [str(r.index) + (" (undone)" if r.restored else ""), r.stage, str(r.steps), f"{r.tokens:,}"]
            cells += [fmt(r.weights.get(s), ".3f") for s in sources]
            cells += [fmt(r.ppl.get(s), ".2f") for s in sources]
            cells += [fmt(r.mean_ppl, ".2f")] + ([fmt(r.instruction_loss, ".4f")] if has_instr else [])
            cells += [fmt(r.gain, "+.2%")]
            lines.append("| " + " | ".join(cells) + " |")
        if self.dense_ppl:
            dense = ["dense", "", "", ""] + [""] * len(sources) + [fmt(self.dense_ppl.get(s), ".2f") for s in sources]
            dense += [fmt(math.exp(mean_log({s: self.dense_ppl[s] for s in sources if s in self.dense_ppl})), ".2f")]
            dense += ([fmt(self.dense_instruction_loss, ".4f")] if has_instr else []) + [""]
            lines.append("| " + " | ".join(dense) + " |")
        return "\n".join(lines)


register_analysis("recover-dynamic", RecoveryResult)


class DensePerplexity(dict[str, float]):
    """Source -> perplexity of the dense model, and the evaluation ``settings`` it was measured with
    (``None``: given by the caller, trusted for any settings when there is no dense model).

    Example:
        >>> ppl = DensePerplexity({"kjv": 20.0})
        >>> ppl["kjv"], ppl.settings
        (20.0, None)
    """

    def __init__(self, ppl: Mapping[str, float] | None = None, settings: dict[str, Any] | None = None) -> None:
        super().__init__(ppl or {})
        self.settings = settings


register_analysis("dense-perplexity", DensePerplexity)

DENSE_REFERENCE = OneOf((DENSE, DensePerplexity))
"""What the pretraining stage measures degradation against: the dense model, or its perplexities."""


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

    stages: Literal["pretrain,instruct", "pretrain+instruct", "pretrain", "instruct"] = "pretrain,instruct"
    """Which datasets to recover on, in order; ``instruct`` alone is the paper's instruction-only ablation
    (in a pipeline string quote it, ``recover-dynamic{stages="pretrain,instruct"}``, or write ``pretrain+instruct``)."""
    instructions: bool = True
    """Run the instruction stage when ``stages`` names it and the data has instructions."""
    max_rounds: int = 5
    """Most rounds per stage."""
    steps_per_round: int = 50
    """Optimizer steps per round (the mixture is rebuilt between rounds)."""
    min_gain: float = 0.005
    """A stage stops once a round improves its metric by less than this fraction."""
    keep_best: bool = True
    """Undo a round that made the stage metric worse (and stop the stage)."""
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
        if self.stages not in ("pretrain,instruct", "pretrain+instruct", "pretrain", "instruct"):
            raise PipelineError(
                "recover-dynamic: stages must be 'pretrain,instruct' (or 'pretrain+instruct'), 'pretrain' or "
                f"'instruct', got {self.stages!r}"
            )
        for opt in ("max_rounds", "steps_per_round", "batch_size", "grad_accum", "eval_batch_size", "lora_r"):
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
            sources = _sources(ctx, data)
        else:  # instruct only: per-source ppl is still tracked where there is validation text
            sources = [s for s in data.train if s in data.validation]
        dense = self._dense_ppl(ctx, data, sources) if "pretrain" in stages else _optional_dense(ctx, sources)
        added = self._add_lora(ctx)
        run = _Run(self, ctx, data, sources, dense)
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
        from shear.runtime.training import ensure_lora

        ctx.model, message = ensure_lora(ctx.model, r=self.lora_r)
        if message:
            ctx.warn(f"recover-dynamic: the model had no LoRA adapters; {message} (merge-lora folds them away)")
        return message is not None


# -- the rounds -------------------------------------------------------------------------------------


class _Run:
    """The state of one recovery run: the streams, the current metrics, and the records so far."""

    def __init__(
        self, p: RecoverDynamic, ctx: Context, data: TextData, sources: list[str], dense: dict[str, float]
    ) -> None:
        from shear.runtime.training import InstructionBatches, TokenBatches

        self.p, self.ctx, self.data, self.sources, self.dense = p, ctx, data, sources, dense
        self.rounds: list[RecoveryRound] = []
        self.stopped: dict[str, str] = {}
        self.bar: Any = None
        self.dense_instr: float | None = None
        self.ppl: dict[str, float] = {}
        self.instr: float | None = None
        self.tokens_stream = (
            TokenBatches({s: data.train[s] for s in sources}, p.batch_size, p.seq_len, seed=p.seed) if sources else None
        )
        self.pad_id = _pad_id(data.tokenizer)
        from shear.passes.lhspg import distill_loss

        self.loss_fn = distill_loss(ctx, p.name, p.teacher, p.distill, p.distill_temperature)
        limit = max_positions(ctx.model)
        self.instr_train = _with_response(ctx, data.instructions, "instructions", limit)
        self.instr_val = _with_response(ctx, data.instructions_val, "instructions_val", limit)
        self.instr_stream = (
            InstructionBatches(self.instr_train, p.batch_size, pad_id=self.pad_id, seed=p.seed)
            if self.instr_train and "instruct" in p.stage_list and p.instructions
            else None
        )
        self.with_instr = self.instr_stream is not None and bool(self.instr_val)

    def evaluate(self) -> tuple[dict[str, float], float | None]:
        p, model = self.p, self.ctx.model
        ppl = (
            self.data.perplexity(
                model, seq_len=p.seq_len, max_windows=p.eval_windows, sources=self.sources, batch_size=p.eval_batch_size
            )
            if self.sources
            else {}
        )
        instr = None
        if self.with_instr:
            instr = instruction_loss(model, self.instr_val, pad_id=self.pad_id, batch_size=p.eval_batch_size)
        return ppl, instr

    def require_instructions(self) -> None:
        """Fail before any training when the instruction stage would have no examples left."""
        if self.with_instr:
            return
        limit = max_positions(self.ctx.model)
        raise DataError(
            "recover-dynamic: every instruction example (train or validation) lost its response to the "
            "tokenizing max length" + (f" or to the model's {limit} positions" if limit else "")
            + "; raise instruction_max_length, or use stages=pretrain"
        )

    def initial(self) -> None:
        self.ppl, self.instr = self.evaluate()
        self.rounds.append(RecoveryRound("initial", 0, {}, dict(self.ppl), self.instr))
        dense_model = self.ctx.dense
        if self.with_instr and isinstance(dense_model, nn.Module) and dense_model is not self.ctx.model:
            self.dense_instr = instruction_loss(
                dense_model, self.instr_val, pad_id=self.pad_id, batch_size=self.p.eval_batch_size
            )

    def metric(self, stage: Stage, ppl: dict[str, float], instr: float | None) -> float:
        if stage == "pretrain":
            return mean_log(ppl)
        assert instr is not None
        return instr

    def stage(self, stage: Stage) -> None:
        p = self.p
        self.stopped[stage] = "max_rounds"
        for k in range(1, p.max_rounds + 1):
            before = self.metric(stage, self.ppl, self.instr)
            weights: dict[str, float] = {}
            deg: dict[str, float] = {}
            if stage == "pretrain":
                assert self.tokens_stream is not None
                deg = degradation(self.ppl, self.dense)
                weights = source_weights(deg, floor=p.floor, temperature=p.temperature, mode=p.mixture)
                self.tokens_stream.set_weights(weights)
                stream: Any = self.tokens_stream
            else:
                stream = self.instr_stream
            saved = _adapters(self.ctx.model) if p.keep_best else None
            trained = self._train(stream, stage, k)
            ppl, instr = self.evaluate()
            gain = relative_gain(before, self.metric(stage, ppl, instr))
            restored = saved is not None and gain < 0
            if restored:
                _restore(self.ctx.model, saved or {})
            else:
                self.ppl, self.instr = ppl, instr
            loss = sum(trained.losses[-p.steps_per_round :]) / max(len(trained.losses[-p.steps_per_round :]), 1)
            self.rounds.append(
                RecoveryRound(
                    stage, k, weights, dict(ppl), instr, deg, trained.steps, trained.tokens, loss, gain, restored
                )
            )
            if self.bar is not None:
                self.bar.set_description(f"recover-dynamic {stage} round {k}: gain {gain:+.2%}")
            if gain < p.min_gain:
                self.stopped[stage] = "worse" if gain < 0 else "converged"
                if self.bar is not None:
                    self.bar.advance((p.max_rounds - k) * p.steps_per_round)
                return

    def _train(self, stream: Any, stage: Stage, k: int) -> Any:
        from shear.runtime.training import TrainConfig, train
        from shear.runtime.training.fingerprint import options_of

        p = self.p
        ckpt = str(Path(p.checkpoint_dir) / f"{stage}-{k:02d}") if p.checkpoint_dir else None
        config = TrainConfig(
            steps=p.steps_per_round,
            lr=p.lr,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            seq_len=p.seq_len,
            seed=p.seed + len(self.rounds),
            gradient_checkpointing=p.gradient_checkpointing,
            checkpoint_dir=ckpt,
            checkpoint_every=p.checkpoint_every if ckpt else 0,
        )
        options = {**options_of(p), "stage": stage, "round": k}
        trained = train(self.ctx.model, stream, config, progress=self.bar, run_options=options, loss_fn=self.loss_fn)
        for w in getattr(trained, "warnings", []):
            if f"recover-dynamic: {w}" not in self.ctx.warnings:
                self.ctx.warn(f"recover-dynamic: {w}")
        return trained

    def result(self, wall: float) -> RecoveryResult:
        return RecoveryResult(
            rounds=tuple(self.rounds),
            dense_ppl=dict(self.dense),
            dense_instruction_loss=self.dense_instr,
            stopped=dict(self.stopped),
            wall_s=wall,
        )


# -- helpers ----------------------------------------------------------------------------------------


def _sources(ctx: Context, data: TextData) -> list[str]:
    """Training sources that have validation text (the others cannot be weighed; they are left out)."""
    sources = [s for s in data.train if s in data.validation]
    if not sources:
        raise DataError(
            f"recover-dynamic weighs sources by their validation perplexity, but no training source "
            f"({sorted(data.train)}) has validation text ({sorted(data.validation)}); give "
            "TextData.from_texts(tokenizer, train, validation) the same source names"
        )
    left = [s for s in data.train if s not in data.validation]
    if left:
        ctx.warn(f"recover-dynamic: sources {left} have no validation text and are left out of recovery")
    return sources


def _optional_dense(ctx: Context, sources: list[str]) -> dict[str, float]:
    cached = ctx.find(DensePerplexity)
    if isinstance(cached, Mapping) and all(s in cached for s in sources):
        return {s: float(cached[s]) for s in sources}
    return {}


def _with_response(
    ctx: Context, examples: list[tuple[torch.Tensor, torch.Tensor]], split: str, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The examples that keep response tokens (tokenizing at a max length can cut a response off),
    each cut to the model's ``limit`` positions (learned position embeddings end there)."""
    if limit is not None and any(len(ids) > limit for ids, _ in examples):
        ctx.warn(f"recover-dynamic: TextData.{split} examples are cut to the model's {limit} positions")
        examples = [(ids[:limit], labels[:limit]) for ids, labels in examples]
    kept = [(ids, labels) for ids, labels in examples if bool((labels[1:] != -100).any())]
    if len(kept) < len(examples):
        ctx.warn(
            f"recover-dynamic: left out {len(examples) - len(kept)} of {len(examples)} TextData.{split} examples "
            "whose response was cut off by the tokenizing max length (raise instruction_max_length)"
        )
    return kept


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) parameters: what a round changes."""
    from shear.runtime.training import is_lora_param

    return {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_param(n)}


@torch.no_grad()
def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in saved:
            p.copy_(saved[n])


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
    return f"{'; '.join(parts)} after {rounds}: {r.steps} steps, {r.tokens:,} tokens"


def _stats(r: RecoveryResult) -> dict[str, Any]:
    stats: dict[str, Any] = {"steps": r.steps, "tokens": r.tokens, "rounds": len(r.rounds) - 1, "table": r.table()}
    if r.initial.ppl:
        stats["ppl_before"] = r.initial.mean_ppl
        stats["ppl_after"] = r._last_kept().mean_ppl
    if r.final_instruction_loss is not None:
        stats["instruction_loss_before"] = r.initial.instruction_loss
        stats["instruction_loss_after"] = r.final_instruction_loss
    return stats
