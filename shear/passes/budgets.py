"""Training budgets of the LoRAShear pipeline by name: ``quick``, ``default``, ``paper``.

A budget names the step counts (and the batch and sequence sizes that go with them) of the three
passes that train or measure: knowledge distribution, LHSPG and dynamic recovery. The command line
takes one by name (``shear prune MODEL --ratio 0.2 --budget quick -o OUT``); ``auto`` picks by model
size (:func:`auto_budget`). :func:`lorashear_pipeline` spells the whole pipeline as a string, so
what ran is printed and reproducible.

The LoRAShear paper reports its cost ("one GPU within a couple of GPU days" for LLaMA-7B) but no
step counts; ``paper`` is the longest budget here, sized for such a run on one GPU, not a copy of
the paper's (unpublished) schedule. Every budget spends about a quarter of its steps in LHSPG, with
no warm-up, and the rest recovering the final structure on the pretraining text: at an equal token
budget that schedule beat the paper's shape (a warm-up, LHSPG most of the steps, half of recovery
on instructions) (docs/results/ablation.md).

Example:
    >>> lorashear_pipeline(0.2, "quick").split(",lhspg")[0].split(",")[:2]
    ['lora{r=8}', 'discover-groups']
    >>> BUDGETS["quick"].lhspg_steps, BUDGETS["default"].lhspg_steps, BUDGETS["default"].recover_steps
    (4, 12, 48)
    >>> auto_budget(135_000_000), auto_budget(7_000_000_000)
    ('default', 'quick')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shear.errors import PipelineError

__all__ = ["Budget", "BUDGETS", "auto_budget", "lorashear_pipeline", "lhspg_steps", "AUTO_QUICK_ABOVE"]


@dataclass(frozen=True)
class Budget:
    """Options of the knowledge-distribution, lhspg and recover-dynamic passes, as pipeline strings."""

    name: str
    knowledge: str
    lhspg: str
    recover: str
    about: str
    """One line for ``--help``: what the budget is for."""

    def __post_init__(self) -> None:
        for opts in (self.knowledge, self.lhspg, self.recover):
            if "{" in opts or "}" in opts:
                raise PipelineError(f"budget {self.name}: options are written without braces, got {opts!r}")

    @property
    def lhspg_steps(self) -> int:
        """Optimizer steps LHSPG trains: warm-up plus periods times steps per period."""
        return lhspg_steps(self.lhspg)

    @property
    def recover_steps(self) -> int:
        """Largest number of recovery steps (rounds times steps per round, per stage)."""
        return _option_int(self.recover, "max_rounds") * _option_int(self.recover, "steps_per_round")


def lhspg_steps(opts: str) -> int:
    """Optimizer steps of an ``lhspg`` option string: warm-up plus periods times steps per period
    (a missing option counts 0).

    Example:
        >>> lhspg_steps("warmup=8,periods=4,steps_per_period=8")
        40
    """
    return _option_int(opts, "warmup") + _option_int(opts, "periods") * _option_int(opts, "steps_per_period")


def _option_int(opts: str, key: str) -> int:
    """The integer ``key=N`` of an option string, 0 when absent."""
    m = re.search(rf"\b{key}=(\d+)", opts)
    return int(m.group(1)) if m else 0


BUDGETS: dict[str, Budget] = {
    b.name: b
    for b in (
        Budget(
            "quick",
            knowledge="max_windows=1,seq_len=64",
            lhspg="periods=1,steps_per_period=4,warmup=0,batch_size=1,seq_len=64",
            recover="max_rounds=2,steps_per_round=4,batch_size=1,seq_len=64,eval_windows=1",
            about="a few steps per stage: checks that the pipeline runs end to end (minutes on a CPU)",
        ),
        Budget(
            "default",
            knowledge="max_windows=1,seq_len=128",
            lhspg="periods=4,steps_per_period=3,warmup=0,batch_size=4,seq_len=128",
            recover="max_rounds=4,steps_per_round=12,batch_size=4,seq_len=128,eval_windows=2",
            about="a short real run: tens of steps per stage (the demo's step counts for SmolLM2-135M on a CPU)",
        ),
        Budget(
            "paper",
            knowledge="max_windows=4,seq_len=512",
            lhspg="periods=10,steps_per_period=100,warmup=0,batch_size=8,seq_len=512",
            recover="max_rounds=4,steps_per_round=775,batch_size=8,seq_len=512,eval_windows=8",
            about="thousands of steps at sequence length 512: sized for one GPU",
        ),
    )
}
"""The named budgets, shortest first."""

AUTO_QUICK_ABOVE = 2_000_000_000
"""``auto`` picks ``quick`` for models with more parameters than this (a CPU run of ``default`` on a
7B model takes hours), ``default`` otherwise; name a budget to choose yourself."""


def auto_budget(params: int) -> str:
    """The budget ``auto`` picks for a model of ``params`` parameters (see :data:`AUTO_QUICK_ABOVE`)."""
    return "quick" if params > AUTO_QUICK_ABOVE else "default"


def lorashear_pipeline(ratio: float, budget: str | Budget = "default", lora_r: int = 8) -> str:
    """The LoRAShear pipeline string removing ``ratio`` of the parameters with ``budget``'s step counts."""
    if not 0.0 < ratio < 1.0:
        raise PipelineError(f"ratio must be in (0, 1), got {ratio}")
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise PipelineError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)} (or auto)")
        budget = BUDGETS[budget]
    return (
        f"lora{{r={lora_r}}},discover-groups,knowledge-distribution{{{budget.knowledge}}},"
        f"lhspg{{ratio={ratio:g},{budget.lhspg}}},erase,recover-dynamic{{{budget.recover}}},merge-lora"
    )
