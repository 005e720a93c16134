"""What ``recover-dynamic`` produces: one record per round, the run's result, and the dense perplexity it measures against.

Example:
    >>> DensePerplexity({"kjv": 20.0})["kjv"]
    20.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from shear.errors import PassError
from shear.kernels.recovery import (
    mean_log,
)
from shear.passes.base import (
    DENSE,
    OneOf,
    register_analysis,
)

__all__ = [
    "Stage", "RecoveryRound", "RecoveryResult", "DensePerplexity", "DENSE_REFERENCE", "BUDGET_SPENT", "NO_VALIDATION",
    "patience_stop",
]  # fmt: skip

Stage = Literal["pretrain", "instruct"]

BUDGET_SPENT = "budget spent"
"""Why a stage stopped: every round of its budget ran."""
NO_VALIDATION = "no validation data"
"""Why a stage stopped: it had nothing to measure, so it ran every round (the budget) unmeasured."""


def patience_stop(patience: int, min_gain: float) -> str:
    """Why a stage stopped early: ``patience`` rounds in a row without a ``min_gain`` perplexity gain.

    Example:
        >>> patience_stop(2, 0.005)
        'patience: 2 rounds without a 0.5% perplexity gain'
    """
    return f"patience: {patience} round{'s' if patience != 1 else ''} without a {min_gain:.1%} perplexity gain"


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
    """Share by which the stage's validation perplexity fell over the round (negative: it rose)."""
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
    """Stage -> which rule stopped it: :data:`BUDGET_SPENT`, :func:`patience_stop`'s text or :data:`NO_VALIDATION`."""
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
