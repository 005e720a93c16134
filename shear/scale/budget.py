"""What a LoRAShear budget costs before it runs: tokens per stage and an estimated time.

:func:`plan_budget` turns a budget name (``quick``, ``default``, ``paper`` or ``auto``) into a
:class:`BudgetPlan` for one model on one device: the training tokens of LHSPG and recovery, the
forward tokens of knowledge distribution, and the time they take at the forward rate measured on
that device. The rate comes from one timed forward of the model itself at the training shape when
its weights are on that device (a training step counted as :data:`STEP_FORWARDS` forwards), else
from a timed matmul on that device at :data:`MATMUL_EFFICIENCY` of its rate, for ``2 * params``
FLOPs per token (a model on the meta device, or one not moved yet). It is an estimate; the progress
bars show the remaining time as the run goes.

``auto`` never runs a smoke test: on a GPU it sizes a real run (:func:`shear.passes.budgets.auto_budget`);
on a CPU a model above :data:`~shear.passes.budgets.AUTO_CPU_LIMIT` parameters is refused with a
:class:`~shear.errors.TrainingError` that names ``--budget`` and the estimated time, unless a budget
is named.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> with torch.device("meta"):
    ...     model = LlamaForCausalLM(LlamaConfig())          # 6.7B parameters, no weights
    >>> plan_budget(model, "auto", "cpu")                    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    shear.errors.TrainingError: --budget auto: ... --budget ...
    >>> print(plan_budget(model, "quick", "cpu", rate=1000.0).format())   # doctest: +ELLIPSIS
    budget quick (--budget): LHSPG 256 tokens (4 steps of 1 x 64), recovery up to 512 tokens (2 rounds x 4 steps), ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from shear.errors import TrainingError
from shear.passes.budgets import AUTO_CPU_LIMIT, BUDGETS, Budget, auto_budget

__all__ = ["BudgetPlan", "plan_budget", "forward_rate", "matmul_rate", "STEP_FORWARDS", "MATMUL_EFFICIENCY"]

STEP_FORWARDS = 3.0
"""A LoRA training step costs about this many forwards of its tokens (the forward, and a backward
through the frozen weights about twice as long)."""

MATMUL_EFFICIENCY = 0.5
"""Share of a large matmul's FLOP rate a model's forward reaches (attention, norms, small shapes)."""

CALIBRATION_WINDOWS = 8
"""Training windows the knowledge-distribution proxy scores (``knowledge-distribution{calibration}``)."""


@dataclass(frozen=True)
class BudgetPlan:
    """A budget for one model on one device: tokens per stage and the estimated wall time."""

    budget: Budget
    params: int
    device: str
    sources: int
    """Validation sources each measurement and evaluation reads."""
    measurements: int
    """Knowledge-distribution measurements expected (one per decoder layer: its MLP channels)."""
    rate: float
    """Forward tokens per second on ``device``."""
    how: str
    """How ``rate`` was measured."""
    why: str = ""
    """How the budget was chosen (``--budget``, or what ``auto`` read)."""

    @property
    def knowledge_tokens(self) -> int:
        """Forward tokens of knowledge distribution: the base and every measurement on every source,
        and the proxy's calibration windows."""
        b = self.budget
        per = max(1, b.knowledge_tokens // b.seq_len) * b.seq_len
        return (self.measurements + 1) * self.sources * per + CALIBRATION_WINDOWS * b.seq_len

    @property
    def evaluation_tokens(self) -> int:
        """Forward tokens of recovery's evaluations (the dense model, the start and every round)."""
        b = self.budget
        return (b.rounds + 2) * self.sources * b.eval_windows * b.seq_len

    @property
    def seconds(self) -> float:
        """Estimated wall time of the three stages."""
        b = self.budget
        work = STEP_FORWARDS * b.training_tokens + self.knowledge_tokens + self.evaluation_tokens
        return work / self.rate

    def stage_seconds(self) -> dict[str, float]:
        """Estimated seconds of each stage."""
        b = self.budget
        return {
            "knowledge distribution": self.knowledge_tokens / self.rate,
            "LHSPG": STEP_FORWARDS * b.lhspg_steps * b.row_tokens / self.rate,
            "recovery": (STEP_FORWARDS * b.recover_steps * b.row_tokens + self.evaluation_tokens) / self.rate,
        }

    def format(self) -> str:
        """Two lines: tokens per stage, then the estimated time and how it was measured."""
        b = self.budget
        shape = f"{b.batch_size} x {b.seq_len}"
        stages = ", ".join(f"{k} {_duration(v)}" for k, v in self.stage_seconds().items())
        return (
            f"budget {b.name}{f' ({self.why})' if self.why else ''}: LHSPG {b.lhspg_steps * b.row_tokens:,} tokens "
            f"({b.lhspg_steps} steps of {shape}), recovery up to {b.recover_steps * b.row_tokens:,} tokens "
            f"({b.rounds} rounds x {b.steps_per_round} steps), knowledge distribution {self.knowledge_tokens:,} "
            f"forward tokens ({b.knowledge_tokens // b.seq_len or 1} x {b.seq_len} per source and measurement)\n"
            f"estimated time on {self.device}: {_duration(self.seconds)} ({stages}; {self.rate:,.{0 if self.rate >= 10 else 2}f} "
            f"forward tokens/s from {self.how})"
        )


def _duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.5 h`` or ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} days"


def _params(model: nn.Module) -> int:
    from shear.kernels.allocation import base_param_count

    return base_param_count(model)


def _layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_hidden_layers", 0) or 0) or 1


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square matmul on ``device`` (the best of three, after a warm-up)."""
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / max(best, 1e-9)


@torch.no_grad()
def forward_rate(model: nn.Module, batch_size: int, seq_len: int) -> float:
    """Forward tokens per second of ``model`` on ``batch_size x seq_len`` token ids (one timed forward
    after a short warm-up), where its weights are."""
    from shear.model.devices import model_device

    device = model_device(model)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids[:1, : min(seq_len, 16)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
    finally:
        model.train(was_training)
    return batch_size * seq_len / max(seconds, 1e-9)


def _rate(model: nn.Module, budget: Budget, device: torch.device, params: int) -> tuple[float, str]:
    from shear.model.devices import model_device, model_dtype

    if model_device(model) == device and device.type != "meta":
        return forward_rate(model, budget.batch_size, budget.seq_len), (
            f"one timed forward of {budget.batch_size} x {budget.seq_len} tokens"
        )
    return _matmul_only(device, params, model_dtype(model) if device.type == "cuda" else torch.float32)


def plan_budget(
    model: nn.Module, name: str, device: str | torch.device, *, sources: int = 5, rate: float | None = None
) -> BudgetPlan:
    """The :class:`BudgetPlan` of budget ``name`` (or ``auto``) for ``model`` run on ``device``;
    ``rate`` (forward tokens/s) skips the measurement. ``auto`` on a CPU with a model above
    :data:`~shear.passes.budgets.AUTO_CPU_LIMIT` parameters raises :class:`TrainingError` with the
    estimated time of a real (GPU-sized) run and of ``default`` here, naming ``--budget``."""
    dev = torch.device(device)
    params = _params(model)
    if name == "auto":
        budget = auto_budget(params, dev.type)
        why = f"auto for {params / 1e6:,.1f}M parameters on {dev.type}"
    else:
        if name not in BUDGETS:
            raise TrainingError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)} or auto (--budget)")
        budget, why = BUDGETS[name], "--budget"
    if budget is None:
        real = auto_budget(params, "cuda")
        assert real is not None
        measured, how = (rate, "the given rate") if rate is not None else _matmul_only(dev, params)
        full = BudgetPlan(real, params, dev.type, sources, _layers(model), measured, how)
        short = BudgetPlan(BUDGETS["default"], params, dev.type, sources, _layers(model), measured, how)
        raise TrainingError(
            f"--budget auto: a {params / 1e9:.1f}B-parameter model is above the {AUTO_CPU_LIMIT / 1e9:.0f}B that "
            f"auto trains on a {dev.type}: a real run ({real.training_tokens:,} training tokens) would take about "
            f"{_duration(full.seconds)} here, --budget default ({short.budget.training_tokens:,} tokens) about "
            f"{_duration(short.seconds)} (estimated from {how}); run on a GPU (--device cuda), or name a budget "
            f"to run here anyway (--budget quick|default|paper)"
        )
    if rate is not None:
        measured, how = rate, "the given rate"
    else:
        measured, how = _rate(model, budget, dev, params)
    return BudgetPlan(budget, params, dev.type, sources, _layers(model), measured, how, why)


def _matmul_only(device: torch.device, params: int, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """Forward tokens/s from a timed matmul, without running the model (a refusal never runs it)."""
    flops = matmul_rate(device, dtype)
    return MATMUL_EFFICIENCY * flops / (2 * params), f"a timed matmul ({flops / 1e9:,.0f} GFLOP/s) on {device.type}"
