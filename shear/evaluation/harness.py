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

import difflib
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from shear.errors import DataError, ModelLoadError

__all__ = ["INSTALL_HINT", "harness_accuracy", "lm_eval_available", "lm_eval_harness"]


def lm_eval_available() -> bool:
    """Whether the ``lm_eval`` package is importable."""
    return importlib.util.find_spec("lm_eval") is not None


INSTALL_HINT = "pip install lm_eval  (or pip install -e '.[eval]')"
"""How to get lm-evaluation-harness: the one sentence every error about it ends with."""


def lm_eval_harness(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval-harness ``tasks`` on an in-memory model; returns ``{task: metrics}``.

    ``include_path`` adds a folder of task YAMLs (shear's bundled tasks, written by
    :mod:`shear.data.harness_tasks`); ``include_defaults=False`` indexes only those (the harness's own
    index of thousands of tasks takes seconds to build). A name the index lacks is a
    :class:`DataError` before anything runs; so is a task whose dataset cannot be loaded offline.
    """
    if not lm_eval_available():
        raise ModelLoadError(
            "lm-evaluation-harness is not installed, so tasks " + ", ".join(tasks) + " cannot run. Install it "
            f"with: {INSTALL_HINT} (its datasets must be in the local HF cache when offline); "
            "without --tasks, shear's bundled multiple-choice tasks need nothing extra."
        )
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        near = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        hints = "; ".join(f"{t!r}" + (f" (did you mean {', '.join(near[t])}?)" if near[t] else "") for t in unknown)
        raise DataError(
            f"lm-eval does not know the task {hints}. `lm-eval ls tasks` lists the names it knows"
            + ("" if include_defaults else f"; shear's bundled ones are {', '.join(sorted(known))}")
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
            log_samples=False,
        )  # fmt: skip
    except (ConnectionError, OSError) as e:
        raise DataError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({type(e).__name__}: {e}). shear never "
            "downloads: put the dataset in the local Hugging Face cache first (datasets.load_dataset on a "
            "connected machine), or run shear's bundled tasks (shear_define_word, ...) that need no download"
        ) from e
    if out is None:
        raise DataError(f"lm-eval returned no results for {', '.join(tasks)}; run it in a single process")
    return dict(out["results"])


def harness_accuracy(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """lm-eval's results as the verdict's task rows: ``acc`` and ``acc_norm`` apart, each named as such.

    Example:
        >>> harness_accuracy({"t": {"acc,none": 0.5, "acc_norm,none": 0.6, "acc_stderr,none": 0.1, "sample_len": 20}})
        {'t': {'accuracy': 0.5, 'accuracy_norm': 0.6, 'n': 20, 'chance': None, 'stderr': 0.1, 'by': 'lm-eval'}}
    """
    out = {}
    for task, metrics in results.items():

        def metric(name: str, metrics: Mapping[str, Any] = metrics) -> float | None:
            value = metrics.get(f"{name},none", metrics.get(name))
            return float(value) if isinstance(value, (int, float)) else None

        out[task] = {
            "accuracy": metric("acc"), "accuracy_norm": metric("acc_norm"), "n": metrics.get("sample_len"),
            "chance": None, "stderr": metric("acc_stderr"), "by": "lm-eval",
        }  # fmt: skip
    return out
