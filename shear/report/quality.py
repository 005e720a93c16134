"""The quality verdict of a compile run: the dense model measured before the passes, the result after.

``shear.compile(..., evaluate=True|"quick"|"full")`` starts a :class:`QualityCheck` before the first
pass and finishes it after the last; the :class:`~shear.evaluation.verdict.Verdict` lands on the
compile report (``small.shear_report.verdict``) and first on ``report.html``. The held-out text is
the run's ``TextData`` validation split (else the bundled corpus's); a run without text data skips
the evaluation with a warning that says why.

Example:
    >>> check, skipped = QualityCheck.start(model, data, "quick")          # doctest: +SKIP
    >>> # ... the passes run ...
    >>> verdict = check.finish(small, dense=model)                         # doctest: +SKIP
    >>> verdict.judgement                                                  # doctest: +SKIP
    'good'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shear.data.heldout import held_out
from shear.data.text import TextData
from shear.errors import DataError
from shear.evaluation.quality import EvalSize, HeldOut, QualityResult, eval_size, evaluate_model
from shear.evaluation.verdict import Verdict, compare_speed_lazily
from shear.model.devices import model_device
from shear.progress import ProgressSink

__all__ = ["QualityCheck", "check_evaluate_option"]


def check_evaluate_option(evaluate: Any) -> EvalSize | None:
    """``evaluate=`` as a size (``None``: off), or an :class:`~shear.errors.InputError` before any work."""
    if evaluate is False or evaluate is None:
        return None
    return eval_size(evaluate)


class QualityCheck:
    """The dense measurement, kept until the pruned model can be measured on the same held-out set."""

    def __init__(self, size: EvalSize, held: HeldOut, before: QualityResult, sink: ProgressSink | None) -> None:
        self.size = size
        self.held = held
        self.before = before
        self.sink = sink

    @classmethod
    def start(
        cls, model: nn.Module, data: Any, evaluate: Any, *, sink: ProgressSink | None = None
    ) -> tuple[QualityCheck | None, str | None]:
        """Measure the dense ``model``; ``(None, why)`` when the evaluation cannot run (``(None, None)``: off)."""
        size = check_evaluate_option(evaluate)
        if size is None:
            return None, None
        if not isinstance(data, TextData):
            got = "no data" if data is None else f"data of type {type(data).__name__}"
            return None, (
                f"evaluate: skipped, the quality verdict needs text data and got {got}; pass "
                "data=TextData.from_corpus(tokenizer) (shear prune: a model folder with its tokenizer, or --data)"
            )
        if model_device(model).type == "meta":
            return None, "evaluate: skipped, the model has no weights (meta device)"
        try:
            held = held_out(data, size=size)
        except DataError as e:
            return None, f"evaluate: skipped: {e}"
        try:
            before = evaluate_model(model, held, size=size, progress=sink, label="(dense)")
        except Exception as e:  # noqa: BLE001 - the run goes on without a verdict, saying why
            return None, f"evaluate: skipped, the dense model could not be measured ({type(e).__name__}: {e})"
        return cls(size, held, before, sink), None

    def finish(self, model: nn.Module, dense: nn.Module | None, warn: Callable[[str], None]) -> Verdict | None:
        """Measure the pruned ``model`` and judge it; ``dense`` (the caller's untouched model) for speed.

        The pruned model matters more than its verdict: a failure to measure it is passed to ``warn``
        (and ``None`` returned), never raised after the passes ran.
        """
        try:
            after = evaluate_model(model, self.held, size=self.size, progress=self.sink, label="(pruned)")
        except Exception as e:  # noqa: BLE001 - reported, and the pruned model is still returned
            warn(f"evaluate: no verdict, the pruned model could not be measured ({type(e).__name__}: {e})")
            return None
        speed, note = compare_speed_lazily(dense, model, self.size)
        return Verdict.from_pair(self.before, after, speed=speed, speed_note=note or "not measured")
