"""Evaluation: sliding-window perplexity per source, multiple-choice scoring, greedy generation,
and lm-eval-harness when installed.

Example:
    >>> from shear.data import load_corpus                                   # doctest: +SKIP
    >>> from shear.evaluation import evaluate_perplexity             # doctest: +SKIP
    >>> print(evaluate_perplexity(model, tok, load_corpus("validation")).table())  # doctest: +SKIP
"""

from __future__ import annotations

from shear.evaluation.choice import ChoiceResult, MultipleChoice, option_logprobs, score_choices
from shear.evaluation.generation import greedy_generate
from shear.evaluation.harness import harness_accuracy, lm_eval_available, lm_eval_harness
from shear.evaluation.perplexity import (
    PerplexityReport,
    PerplexityResult,
    evaluate_perplexity,
    forward_tokens,
    nll_sum,
    perplexity,
    perplexity_ids,
    sliding_windows,
    window_perplexity,
)
from shear.evaluation.quality import SIZES, EvalSize, HeldOut, QualityResult, eval_size, evaluate_model
from shear.evaluation.speed import SpeedComparison, SpeedResult, compare_speed, measure_speed
from shear.evaluation.verdict import Thresholds, Verdict, check_comparable

__all__ = [
    "SIZES",
    "SpeedComparison",
    "SpeedResult",
    "compare_speed",
    "measure_speed",
    "ChoiceResult",
    "EvalSize",
    "HeldOut",
    "QualityResult",
    "Thresholds",
    "Verdict",
    "check_comparable",
    "eval_size",
    "evaluate_model",
    "harness_accuracy",
    "MultipleChoice",
    "PerplexityReport",
    "PerplexityResult",
    "evaluate_perplexity",
    "forward_tokens",
    "greedy_generate",
    "lm_eval_available",
    "lm_eval_harness",
    "option_logprobs",
    "perplexity",
    "perplexity_ids",
    "score_choices",
    "sliding_windows",
    "nll_sum",
    "window_perplexity",
]
