"""shear's bundled multiple-choice tasks written for lm-evaluation-harness, so they run offline through it.

Each bundled task (:data:`shear.data.heldout.BUNDLED_TASKS`) becomes ``shear_<name>`` (``-`` as
``_``): a JSON-lines file of its items and a task YAML that scores ``context + option`` exactly
as shear's own scorer does (no delimiter, zero-shot), so lm-eval's ``acc`` equals shear's accuracy.
Any other task name goes to the harness's own index.

Example:
    >>> run = harness_run(["shear_define_word"], size="quick")           # doctest: +SKIP
    >>> run.include_defaults, sorted(p.name for p in Path(run.include_path).iterdir())   # doctest: +SKIP
    (False, ['shear_define_word.jsonl', 'shear_define_word.yaml'])
    >>> harness_name("next-line-kjv")
    'shear_next_line_kjv'
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

from shear.data.heldout import BUNDLED_TASKS
from shear.errors import DataError, ModelLoadError
from shear.evaluation.harness import INSTALL_HINT, lm_eval_available
from shear.evaluation.quality import EvalSize, HarnessRun, eval_size

__all__ = ["harness_name", "harness_run", "write_harness_task"]


def harness_name(task: str) -> str:
    """The lm-eval name of a bundled task."""
    return "shear_" + task.replace("-", "_")


_BY_HARNESS_NAME = {harness_name(t): t for t in BUNDLED_TASKS}


def write_harness_task(folder: Path, task: str, n: int) -> Path:
    """Write bundled ``task`` (``n`` items) as ``<folder>/shear_<task>.yaml`` and its ``.jsonl``; returns the YAML."""
    name = harness_name(task)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for item in BUNDLED_TASKS[task](n):
            f.write(json.dumps({"context": item.context, "options": list(item.options), "answer": item.answer}) + "\n")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_target: answer\n"
        'doc_to_choice: "{{options}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n",
        encoding="utf-8",
    )
    return yaml


def harness_run(
    tasks: Sequence[str], *, size: str | bool | EvalSize = "quick", limit: int | None = None, batch_size: int = 4
) -> HarnessRun:
    """What ``shear eval --tasks`` runs: lm-eval ``tasks``, shear's own (``shear_*``) written to a
    temporary folder that lives as long as the returned run.

    Refuses before any model loads: lm-eval missing (how to install it), an empty list, or a
    ``shear_*`` name that is not a bundled task (the list of those). Other names are checked against
    the harness's index when it runs.
    """
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise DataError("--tasks names no task; give lm-eval task names separated by commas, e.g. --tasks shear_define_word")
    if limit is not None and limit < 1 or batch_size < 1:
        raise DataError(f"--limit {limit} / --batch-size {batch_size}: both must be positive integers")
    if not lm_eval_available():
        raise ModelLoadError(
            f"--tasks {','.join(names)} runs lm-evaluation-harness, which is not installed: {INSTALL_HINT}. "
            "Without --tasks, shear eval scores its bundled multiple-choice tasks with nothing extra"
        )
    own = [t for t in names if t.startswith("shear_")]
    unknown = [t for t in own if t not in _BY_HARNESS_NAME]
    if unknown:
        raise DataError(
            f"unknown task {', '.join(map(repr, unknown))}: shear's bundled tasks are {', '.join(sorted(_BY_HARNESS_NAME))}; "
            "`lm-eval ls tasks` lists the harness's own"
        )
    s = eval_size(size)
    counts = dict(s.tasks)
    folder = Path(tempfile.mkdtemp(prefix="shear-lm-eval-"))
    for t in own:
        task = _BY_HARNESS_NAME[t]
        write_harness_task(folder, task, counts.get(task, max(counts.values())))
    run = HarnessRun(
        tuple(names), str(folder), include_defaults=len(own) < len(names), limit=limit, batch_size=batch_size
    )
    weakref.finalize(run, shutil.rmtree, folder, True)
    return run
