"""Training budgets of the LoRAShear pipeline, in tokens: ``quick``, ``default``, ``paper``, ``auto``.

A budget names the training tokens of each stage that trains (LHSPG, dynamic recovery), the
validation tokens per source of each knowledge-distribution measurement, and the batch and
sequence sizes they run at; step counts follow (``tokens / (batch_size * seq_len)``). The command
line takes one by name (``shear prune MODEL --ratio 0.2 --budget quick -o OUT``); ``auto`` sizes
one for the model and the device (:func:`auto_budget`): on a GPU a real run of at least
:data:`MIN_GPU_TOKENS` training tokens (:data:`GPU_TOKENS_PER_KPARAM` per thousand parameters, at
most the ``paper`` budget's), on a CPU ``default`` up to :data:`AUTO_CPU_LIMIT` parameters and none above
(the caller refuses with the estimated time: :mod:`shear.scale.budget`). :func:`lorashear_pipeline`
spells the whole pipeline as a string, so what ran is printed and reproducible.

The LoRAShear paper reports its cost ("one GPU within a couple of GPU days" for LLaMA-7B) but no
step counts; ``paper`` is the longest named budget, sized for such a run on one GPU, not a copy of
the paper's (unpublished) schedule. Every budget spends about a quarter of its tokens in LHSPG, with
no warm-up, and the rest recovering the final structure on the pretraining text: at an equal token
budget that schedule beat the paper's shape (a warm-up, LHSPG most of the steps, half of recovery
on instructions) (docs/results/ablation.md).

Example:
    >>> lorashear_pipeline(0.2, "quick").split(",lhspg")[0].split(",")[:2]
    ['lora{r=8}', 'discover-groups']
    >>> BUDGETS["quick"].lhspg_steps, BUDGETS["default"].lhspg_steps, BUDGETS["default"].recover_steps
    (4, 12, 48)
    >>> BUDGETS["default"].lhspg_tokens, BUDGETS["default"].recover_tokens
    (6144, 24576)
    >>> auto_budget(135_000_000, "cpu").name, auto_budget(7_000_000_000, "cpu")
    ('default', None)
    >>> auto_budget(7_000_000_000, "cuda").training_tokens >= MIN_GPU_TOKENS
    True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from shear.errors import PipelineError

__all__ = [
    "Budget", "BUDGETS", "auto_budget", "lorashear_pipeline", "lhspg_steps", "AUTO_CPU_LIMIT", "MIN_GPU_TOKENS",
    "GPU_TOKENS_PER_KPARAM",
]  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """Tokens per stage and the shapes they run at; the passes' options follow."""

    name: str
    lhspg_tokens: int
    """Training tokens of LHSPG (rounded up to whole steps of every period)."""
    recover_tokens: int
    """Most training tokens of recovery (rounded up to whole steps of every round)."""
    knowledge_tokens: int
    """Validation tokens per source of each knowledge-distribution measurement (whole windows)."""
    batch_size: int
    seq_len: int
    periods: int
    """LHSPG periods."""
    rounds: int
    """Most recovery rounds (the mixture is rebuilt between rounds; patience stops them early)."""
    eval_windows: int
    """Validation windows per source of each recovery evaluation."""
    about: str = ""
    """One line for ``--help``: what the budget is for."""

    def __post_init__(self) -> None:
        for key in ("lhspg_tokens", "recover_tokens", "knowledge_tokens", "batch_size", "seq_len", "periods",
                    "rounds", "eval_windows"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PipelineError(f"budget {self.name}: {key} must be an int >= 1, got {value!r}")

    @property
    def row_tokens(self) -> int:
        """Tokens of one optimizer step (``batch_size * seq_len``)."""
        return self.batch_size * self.seq_len

    @property
    def steps_per_period(self) -> int:
        return math.ceil(self.lhspg_tokens / (self.periods * self.row_tokens))

    @property
    def steps_per_round(self) -> int:
        return math.ceil(self.recover_tokens / (self.rounds * self.row_tokens))

    @property
    def lhspg_steps(self) -> int:
        """Optimizer steps LHSPG trains (periods times steps per period)."""
        return self.periods * self.steps_per_period

    @property
    def recover_steps(self) -> int:
        """Most recovery steps (rounds times steps per round)."""
        return self.rounds * self.steps_per_round

    @property
    def training_tokens(self) -> int:
        """LHSPG's and recovery's tokens as their whole steps train them."""
        return (self.lhspg_steps + self.recover_steps) * self.row_tokens

    @property
    def knowledge(self) -> str:
        return f"max_windows={max(1, self.knowledge_tokens // self.seq_len)},seq_len={self.seq_len}"

    @property
    def lhspg(self) -> str:
        return (f"periods={self.periods},steps_per_period={self.steps_per_period},warmup=0,"
                f"batch_size={self.batch_size},seq_len={self.seq_len}")

    @property
    def recover(self) -> str:
        return (f"max_rounds={self.rounds},steps_per_round={self.steps_per_round},batch_size={self.batch_size},"
                f"seq_len={self.seq_len},eval_windows={self.eval_windows}")


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
        Budget("quick", lhspg_tokens=256, recover_tokens=512, knowledge_tokens=64, batch_size=1, seq_len=64,
               periods=1, rounds=2, eval_windows=1,
               about="a few steps per stage: checks that the pipeline runs end to end (minutes on a CPU)"),
        Budget("default", lhspg_tokens=6_144, recover_tokens=24_576, knowledge_tokens=128, batch_size=4, seq_len=128,
               periods=4, rounds=4, eval_windows=2,
               about="a short real run: 31k training tokens (SmolLM2-135M on a CPU in minutes)"),
        Budget("paper", lhspg_tokens=4_096_000, recover_tokens=12_697_600, knowledge_tokens=2_048, batch_size=8,
               seq_len=512, periods=10, rounds=4, eval_windows=8,
               about="17M training tokens at sequence length 512: sized for one GPU"),
    )
}
"""The named budgets, shortest first."""

AUTO_CPU_LIMIT = 2_000_000_000
"""``auto`` on a CPU: ``default`` up to this many parameters; above it, no budget (a CPU run of a real
budget on a 7B model takes days): the command refuses with the estimate unless one is named."""

MIN_GPU_TOKENS = 1_000_000
"""Fewest training tokens ``auto`` gives a run on a GPU."""

GPU_TOKENS_PER_KPARAM = 2
"""Training tokens per thousand model parameters ``auto`` gives a run on a GPU (between
:data:`MIN_GPU_TOKENS` and the ``paper`` budget's): 14M for a 7B model, the ``paper`` budget's size."""


def auto_budget(params: int, device: str = "cpu") -> Budget | None:
    """The budget ``auto`` picks for ``params`` parameters on a ``device`` type (``cuda``, ``cpu``, ...):
    on ``cuda`` the ``paper`` shape with :data:`GPU_TOKENS_PER_KPARAM` tokens per thousand parameters (at least
    :data:`MIN_GPU_TOKENS`, at most ``paper``'s), a quarter in LHSPG; elsewhere ``default`` up to
    :data:`AUTO_CPU_LIMIT` parameters, else ``None`` (too large to train here: name a budget)."""
    if device != "cuda":
        return BUDGETS["default"] if params <= AUTO_CPU_LIMIT else None
    paper = BUDGETS["paper"]
    tokens = min(max(MIN_GPU_TOKENS, GPU_TOKENS_PER_KPARAM * params // 1000), paper.lhspg_tokens + paper.recover_tokens)
    return Budget("auto", lhspg_tokens=tokens // 4, recover_tokens=tokens - tokens // 4,
                  knowledge_tokens=paper.knowledge_tokens, batch_size=paper.batch_size, seq_len=paper.seq_len,
                  periods=paper.periods, rounds=paper.rounds, eval_windows=paper.eval_windows,
                  about=f"sized for {params / 1e9:.1f}B parameters on a GPU")


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
