"""lm-eval-harness through its Python API, when the user has installed it (optional, not in CI).

lm-eval tasks read their datasets through HF ``datasets``; offline, only tasks whose data is
already in the local datasets cache work. shear's own tasks (:mod:`shear.data.tasks`) need no
download.

Example:
    >>> results = lm_eval_harness(model, tokenizer, ["hellaswag"], limit=100)   # doctest: +SKIP
    >>> results["hellaswag"]["acc,none"]                                        # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from torch import nn

from shear.errors import ModelLoadError

__all__ = ["lm_eval_available", "lm_eval_harness"]


def lm_eval_available() -> bool:
    """Whether the ``lm_eval`` package is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def lm_eval_harness(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval-harness ``tasks`` on an in-memory model; returns ``{task: metrics}``."""
    if not lm_eval_available():
        raise ModelLoadError(
            "lm-eval-harness is not installed, so tasks " + ", ".join(tasks) + " cannot run. Install it "
            "with: pip install lm-eval  (its datasets must be in the local HF cache when offline); "
            "shear.data.next_line_task / define_word_task need nothing extra."
        )
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot)
    return dict(out["results"])
