"""What the quality verdict measures on one model: held-out perplexity per source, multiple-choice
accuracy, and greedy generations of fixed prompts, at a named size.

A :class:`HeldOut` is the fixed input of a measurement (token ids per source, task items, prompts,
and a sentence saying where the text comes from); measuring the dense model and the pruned one on
the same :class:`HeldOut` makes the two comparable. :mod:`shear.data.heldout` builds one from a
``TextData`` (its validation split, else the bundled corpus) or from a tokenizer alone. Sizes:
``quick`` (the default: seconds for a 135M model on two CPU cores) and ``full``
(:data:`SIZES`); an :class:`EvalSize` of your own sets every count.

Example:
    >>> eval_size("quick").tokens, eval_size(True).name
    (256, 'quick')
    >>> from dataclasses import replace
    >>> replace(SIZES["full"], tokens=4096).tokens
    4096
    >>> from shear.data import held_out                                        # doctest: +SKIP
    >>> result = evaluate_model(model, held_out(tokenizer))                    # doctest: +SKIP
    >>> print(result.format())                                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from shear.errors import DataError, InputError
from shear.evaluation.choice import MultipleChoice, score_choices
from shear.evaluation.generation import greedy_generate
from shear.evaluation.harness import harness_accuracy, lm_eval_harness
from shear.evaluation.perplexity import perplexity_ids
from shear.progress import ProgressSink, open_bar

__all__ = [
    "EvalSize",
    "SIZES",
    "PROMPTS",
    "HarnessRun",
    "HeldOut",
    "QualityResult",
    "eval_size",
    "evaluate_model",
]


@dataclass(frozen=True)
class EvalSize:
    """How much a quality measurement reads: every count in one place."""

    name: str
    tokens: int
    """Held-out tokens per source scored for perplexity."""
    window: int
    """Sliding-window length (capped by the model's ``max_position_embeddings``)."""
    stride: int
    """Window stride; ``== window`` scores disjoint chunks (fastest)."""
    tasks: tuple[tuple[str, int], ...]
    """``(bundled task name, items)`` scored by multiple choice (:mod:`shear.data.heldout`)."""
    prompts: int
    """How many of :data:`PROMPTS` are generated greedily."""
    new_tokens: int
    """New tokens per generation."""
    speed_batches: tuple[int, ...] = (1,)
    """Batch sizes of the speed comparison (when ``shear.evaluation.speed`` is present)."""
    speed_repeats: int = 3

    def __post_init__(self) -> None:
        counts = [self.tokens, self.prompts + 1, self.new_tokens, self.speed_repeats, *self.speed_batches]
        counts += [n for _, n in self.tasks]
        if any(not isinstance(n, int) or n < 1 for n in counts) or self.tokens < 2:
            raise InputError(f"evaluation size {self.name!r}: every count must be a positive integer ({self})")
        if self.window < 2 or not 1 <= self.stride <= self.window:
            raise InputError(
                f"evaluation size {self.name!r}: needs window >= 2 and 1 <= stride <= window "
                f"(got window={self.window}, stride={self.stride})"
            )


SIZES: dict[str, EvalSize] = {
    "quick": EvalSize(
        "quick", tokens=256, window=256, stride=256,
        tasks=(("define-word", 16), ("next-line-shakespeare", 8)), prompts=2, new_tokens=16,
    ),
    "full": EvalSize(
        "full", tokens=2048, window=512, stride=256,
        tasks=(("define-word", 50), ("next-line-kjv", 50), ("next-line-shakespeare", 50)),
        prompts=4, new_tokens=40, speed_batches=(1, 8), speed_repeats=5,
    ),
}  # fmt: skip
"""The named sizes: ``quick`` runs by default in every ``shear prune``; ``full`` for reported numbers."""

PROMPTS: tuple[tuple[str, bool], ...] = (
    ("What is the capital of France?", True),
    ("In the beginning God created", False),
    ("The three primary colours are", False),
    ("def fibonacci(n):", False),
)
"""Fixed greedy-generation prompts, ``(prompt, use the chat template when the tokenizer has one)``."""


def eval_size(spec: str | bool | EvalSize) -> EvalSize:
    """The :class:`EvalSize` that ``evaluate=`` / ``--eval-size`` names (``True`` is ``quick``)."""
    if isinstance(spec, EvalSize):
        return spec
    if spec is True:
        return SIZES["quick"]
    if isinstance(spec, str) and spec in SIZES:
        return SIZES[spec]
    raise InputError(
        f"evaluation size {spec!r} is not one of {', '.join(SIZES)}; pass evaluate=True, 'quick', 'full' "
        "or an EvalSize (shear.evaluation.quality) with your own counts"
    )


@dataclass(frozen=True)
class HarnessRun:
    """lm-evaluation-harness tasks to run instead of the bundled ones (:mod:`shear.evaluation.harness`)."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    """A folder of extra task YAMLs (shear's bundled tasks written for the harness)."""
    include_defaults: bool = True
    """Index the harness's own tasks too (slow: needed for any task name not under ``include_path``)."""
    limit: int | None = None
    batch_size: int = 4


@dataclass
class HeldOut:
    """The fixed input of a quality measurement; measure the dense and the pruned model on the same one."""

    tokenizer: Any
    texts: dict[str, torch.Tensor]
    """Source name -> 1-D long tensor of held-out token ids."""
    origin: str
    """Where the text comes from, said in every result (e.g. "the bundled corpus's validation split")."""
    tasks: dict[str, list[MultipleChoice]] = field(default_factory=dict)
    prompts: tuple[tuple[str, bool], ...] = PROMPTS
    harness: HarnessRun | None = None
    notes: list[str] = field(default_factory=list)
    """What is left out and why (no tokenizer: no tasks, no generations)."""

    def __post_init__(self) -> None:
        if not self.texts:
            raise DataError(f"held-out text ({self.origin}) has no sources; give at least one held-out text")
        for name, ids in self.texts.items():
            if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < 2:
                got = ids.numel() if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise DataError(
                    f"held-out source {name!r} ({self.origin}) has {got} tokens; perplexity needs at least 2: "
                    "give it a few paragraphs of text, or leave the source out"
                )


@dataclass
class QualityResult:
    """One model measured on a :class:`HeldOut`: plain data (``to_dict``/``from_dict`` round-trip)."""

    model: str
    params: int
    held_out: str
    size: str
    perplexity: dict[str, dict[str, float]]
    """Source -> ``{"ppl", "tokens"}``."""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Task -> ``{"accuracy", "accuracy_norm", "n", "chance", "stderr", "by"}``: ``accuracy`` is acc (the
    option with the highest summed log-probability wins), ``accuracy_norm`` acc_norm (divided by the
    option's length), ``stderr`` the standard error of ``accuracy``, ``by`` "shear" or "lm-eval"."""
    generations: list[dict[str, str]] = field(default_factory=list)
    """``[{"prompt", "text"}]``, greedy."""
    seconds: float = 0.0
    """Wall time of the measurement."""
    cpu_seconds: float = 0.0
    """CPU time of this process during it (all threads): the cost on a machine other jobs share."""
    notes: list[str] = field(default_factory=list)

    @property
    def mean_ppl(self) -> float:
        """Mean of the per-source perplexities (each source counts once)."""
        return sum(r["ppl"] for r in self.perplexity.values()) / len(self.perplexity)

    @property
    def accuracy(self) -> float | None:
        """Mean acc over the tasks that report one (``None`` without any)."""
        accs = [t["accuracy"] for t in self.tasks.values() if t.get("accuracy") is not None]
        return sum(accs) / len(accs) if accs else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QualityResult:
        return cls(**dict(d))

    def format(self) -> str:
        """Plain-text tables: perplexity per source, accuracy per task, generations."""
        lines = [f"{self.model}: {self.params:,} parameters; held-out: {self.held_out} ({self.size})"]
        lines.append(f"  {'source':<22}{'tokens':>8}{'ppl':>10}")
        lines += [f"  {s:<22}{r['tokens']:>8}{r['ppl']:>10.2f}" for s, r in self.perplexity.items()]
        lines.append(f"  {'mean':<22}{'':>8}{self.mean_ppl:>10.2f}")
        if self.tasks:
            lines.append(f"  {'task':<30}{'n':>5}{'acc':>8}{'acc_norm':>10}  by")
            for name, t in self.tasks.items():
                acc, norm = _fmt(t.get("accuracy")), _fmt(t.get("accuracy_norm"))
                lines.append(f"  {name:<30}{t.get('n') or '-':>5}{acc:>8}{norm:>10}  {t.get('by', '')}")
            lines.append("  acc: the option with the highest summed log-probability; acc_norm: that sum divided by "
                         "the option's length")  # fmt: skip
        for g in self.generations:
            lines.append(f"  {g['prompt']!r} -> {g['text']!r}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  measured in {self.seconds:.1f} s ({self.cpu_seconds:.1f} s of CPU time)")
        return "\n".join(lines)


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def _as_held_out(data: Any, size: EvalSize) -> HeldOut:
    if isinstance(data, HeldOut):
        return data
    build = getattr(data, "held_out", None)
    if callable(build):
        return build(size)  # a shear.data.TextData
    raise DataError(
        f"evaluate_model needs held-out text: a shear.data.TextData (its validation split, or the bundled corpus "
        f"when it has none) or shear.data.held_out(tokenizer) for the bundled corpus; got {type(data).__name__}"
    )


def _window(model: nn.Module, size: EvalSize) -> tuple[int, int]:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    window = min(size.window, limit) if isinstance(limit, int) and limit >= 2 else size.window
    return window, min(size.stride, window)


def _stderr(p: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes (the sample form lm-eval reports)."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate_model(
    model: nn.Module,
    data: Any,
    *,
    size: str | bool | EvalSize = "quick",
    progress: ProgressSink | None = None,
    label: str = "",
) -> QualityResult:
    """Measure ``model`` on held-out text: perplexity per source, task accuracy, greedy generations.

    ``data`` is a :class:`HeldOut` (the same one for the models you compare) or a ``TextData``
    (its validation split, else the bundled corpus). ``progress`` renders a bar (``label`` names it).

    Example:
        >>> r = evaluate_model(model, TextData.from_corpus(tok, max_train_chars=10_000))   # doctest: +SKIP
        >>> r.mean_ppl, r.accuracy                                                        # doctest: +SKIP
        (21.4, 0.56)
    """
    size = eval_size(size)
    held = _as_held_out(data, size)
    window, stride = _window(model, size)
    prompts = held.prompts[: size.prompts] if held.tokenizer is not None else ()
    items = sum(len(v) for v in held.tasks.values())
    start, cpu = time.perf_counter(), time.process_time()
    result = QualityResult(
        model=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        held_out=held.origin,
        size=size.name,
        perplexity={},
        notes=list(held.notes),
    )
    total = len(held.texts) + items + len(prompts) + (1 if held.harness else 0)
    with open_bar(progress, total, f"quality {label}".strip()) as bar:
        for name, ids in held.texts.items():
            r = perplexity_ids(model, ids, name=name, window=window, stride=stride, max_tokens=size.tokens)
            result.perplexity[name] = {"ppl": r.ppl, "tokens": r.tokens}
            bar.advance()
        for task, task_items in held.tasks.items():
            c = score_choices(model, held.tokenizer, task_items, progress=bar.advance)
            result.tasks[task] = {
                "accuracy": c.accuracy, "accuracy_norm": c.accuracy_norm, "n": c.n, "chance": c.chance,
                "stderr": _stderr(c.accuracy, c.n), "by": "shear",
            }  # fmt: skip
        if held.harness is not None:
            h = held.harness
            raw = lm_eval_harness(
                model, held.tokenizer, h.tasks, limit=h.limit, batch_size=h.batch_size, num_fewshot=0,
                include_path=h.include_path, include_defaults=h.include_defaults,
            )  # fmt: skip
            result.tasks.update(harness_accuracy(raw))
            bar.advance()
        if prompts and not callable(getattr(model, "generate", None)):
            result.notes.append(f"no generations: {type(model).__name__} has no generate()")
            prompts = ()
        for prompt, chat in prompts:
            text = greedy_generate(model, held.tokenizer, prompt, chat=chat, max_new_tokens=size.new_tokens)
            result.generations.append({"prompt": prompt, "text": text})
            bar.advance()
    result.seconds, result.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return result
