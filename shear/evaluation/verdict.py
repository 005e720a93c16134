"""The quality verdict: how much of the dense model's quality a pruned model kept, and whether that is good.

Both models are measured on the same held-out text (:func:`evaluate_model`). The headline is the
**perplexity ratio**, dense perplexity / pruned perplexity per source, averaged geometrically over the
sources: "kept 93% of dense quality". The judgement holds it against :class:`Thresholds`:

- **good**: ratio >= 0.90 (the pruned model's perplexity at most ~11% above dense, about 0.1 nats per
  token lost);
- **warn**: 0.70 <= ratio < 0.90;
- **bad**: ratio < 0.70 (perplexity more than ~43% above dense, 0.36 nats per token lost).

The **accuracy ratio** (pruned / dense mean acc on the multiple-choice tasks) is shown beside it and
lowers the judgement when even its optimistic bound (pruned accuracy plus two standard errors of the
difference) is under a threshold: a few dozen items are noisy, so a drop inside the noise does not
count, and neither does accuracy when the dense model is not above chance beyond its own noise.
The speed comparison (``shear.evaluation.speed``, when present) rides along.

Example:
    >>> t = Thresholds()
    >>> t.level(0.95), t.level(0.8), t.level(0.5)
    ('good', 'warn', 'bad')
    >>> dense = QualityResult("m", 100, "text", "quick", {"a": {"ppl": 10.0, "tokens": 255}})
    >>> pruned = QualityResult("m", 80, "text", "quick", {"a": {"ppl": 12.5, "tokens": 255}})
    >>> v = Verdict.from_pair(dense, pruned)
    >>> v.judgement, v.headline
    ('warn', 'kept 80.0% of dense quality')
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from shear.errors import InputError
from shear.evaluation.quality import EvalSize, QualityResult, eval_size, evaluate_model
from shear.model.devices import model_device

__all__ = [
    "Thresholds",
    "Verdict",
    "check_comparable",
    "compare_speed_lazily",
    "evaluate_model",
]

_ORDER = ("good", "warn", "bad")


@dataclass(frozen=True)
class Thresholds:
    """Where good ends and bad begins, as a share of the dense model's quality (a ratio)."""

    good: float = 0.90
    """At or above: good."""
    bad: float = 0.70
    """Below: bad; in between: warn."""

    def __post_init__(self) -> None:
        if not 0 < self.bad <= self.good <= 1:
            raise InputError(f"thresholds need 0 < bad <= good <= 1 (got good={self.good}, bad={self.bad})")

    def level(self, ratio: float) -> str:
        """``good``, ``warn`` or ``bad`` for a quality ratio."""
        return "good" if ratio >= self.good else "bad" if ratio < self.bad else "warn"

    def describe(self) -> str:
        return f"good >= {self.good:.0%}, warn {self.bad:.0%}-{self.good:.0%}, bad < {self.bad:.0%}"


def _worse(a: str, b: str) -> str:
    return max(a, b, key=_ORDER.index)


@dataclass
class Verdict:
    """Dense and pruned measurements, the ratios, and the judgement (``to_dict`` for the report)."""

    before: QualityResult
    after: QualityResult
    thresholds: Thresholds = field(default_factory=Thresholds)
    speed: dict[str, Any] | None = None
    """``SpeedComparison.to_dict()`` when the speed was measured."""
    speed_text: str | None = None
    speed_note: str = "not measured"
    """Why there is no speed comparison (when ``speed`` is ``None``)."""

    @classmethod
    def from_pair(
        cls,
        before: QualityResult,
        after: QualityResult,
        thresholds: Thresholds | None = None,
        *,
        speed: Any = None,
        speed_note: str = "not measured",
    ) -> Verdict:
        """Judge ``after`` (pruned) against ``before`` (dense); both measured on the same held-out text.

        ``speed`` is a ``SpeedComparison`` (or its dict) from ``shear.evaluation.speed.compare_speed``.
        """
        if before.held_out != after.held_out or set(before.perplexity) != set(after.perplexity):
            raise InputError(
                f"the dense and the pruned model were measured on different held-out text ({before.held_out}: "
                f"{sorted(before.perplexity)} vs {after.held_out}: {sorted(after.perplexity)}); measure both on "
                "one HeldOut"
            )
        as_dict = speed.to_dict() if hasattr(speed, "to_dict") else speed
        text = speed.format() if hasattr(speed, "format") else None
        return cls(before, after, thresholds or Thresholds(), as_dict, text, speed_note)

    # -- the ratios ---------------------------------------------------------------------------

    @property
    def ppl_ratios(self) -> dict[str, float]:
        """Per source: dense perplexity / pruned perplexity (1.0 = as good as dense)."""
        return {s: self.before.perplexity[s]["ppl"] / self.after.perplexity[s]["ppl"] for s in self.before.perplexity}

    @property
    def ppl_ratio(self) -> float:
        """Geometric mean of :attr:`ppl_ratios` (each source counts once)."""
        ratios = list(self.ppl_ratios.values())
        if not all(math.isfinite(r) and r > 0 for r in ratios):
            return 0.0  # a perplexity that overflowed or is NaN: nothing of the quality is shown to be kept
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    @property
    def kept(self) -> float:
        """The headline share of dense quality kept: the perplexity ratio."""
        return self.ppl_ratio

    @property
    def headline(self) -> str:
        return f"kept {self.kept:.1%} of dense quality"

    def _accuracy(self) -> tuple[float, float, float, float] | None:
        """``(dense acc, pruned acc, stderr of the difference, dense stderr)`` over the tasks both have."""
        common = [
            t for t, row in self.before.tasks.items()
            if row.get("accuracy") is not None and (self.after.tasks.get(t) or {}).get("accuracy") is not None
        ]  # fmt: skip
        if not common:
            return None
        b = [self.before.tasks[t] for t in common]
        a = [self.after.tasks[t] for t in common]

        def mean(rows: list[dict[str, Any]], key: str) -> float:
            return sum(r[key] for r in rows) / len(rows)

        def se(rows: list[dict[str, Any]]) -> float:
            v = [r.get("stderr") for r in rows]
            return math.sqrt(sum(x * x for x in v if x is not None and math.isfinite(x))) / len(rows)

        return mean(b, "accuracy"), mean(a, "accuracy"), math.hypot(se(b), se(a)), se(b)

    @property
    def accuracy_ratio(self) -> float | None:
        """Pruned mean acc / dense mean acc over the common tasks (``None`` without tasks or at 0)."""
        acc = self._accuracy()
        return acc[1] / acc[0] if acc and acc[0] > 0 else None

    def _accuracy_counts(self) -> tuple[bool, str]:
        """Whether accuracy may lower the judgement, and why not when it may not."""
        acc = self._accuracy()
        if acc is None or acc[0] <= 0:
            return False, "no task accuracy"
        rows = [r for r in self.before.tasks.values() if r.get("chance") is not None]
        chance = sum(r["chance"] for r in rows) / len(rows) if rows else None
        if chance is not None and acc[0] - chance < 2 * acc[3]:
            return False, f"the dense model is within noise of chance ({acc[0]:.3f} vs {chance:.3f}) on these tasks"
        return True, ""

    @property
    def accuracy_bound(self) -> float | None:
        """Optimistic accuracy ratio: (pruned acc + 2 standard errors of the difference) / dense acc."""
        acc = self._accuracy()
        return (acc[1] + 2 * acc[2]) / acc[0] if acc and acc[0] > 0 else None

    # -- the judgement ------------------------------------------------------------------------

    @property
    def judgement(self) -> str:
        """``good``, ``warn`` or ``bad``: the perplexity ratio's level, lowered by accuracy beyond noise."""
        level = self.thresholds.level(self.ppl_ratio)
        counts, _ = self._accuracy_counts()
        bound = self.accuracy_bound
        if counts and bound is not None:
            level = _worse(level, self.thresholds.level(bound))
        return level

    @property
    def reason(self) -> str:
        """Which figure decided the judgement, against which threshold."""
        t, r = self.thresholds, self.ppl_ratio
        level = t.level(r)
        if level == "good":
            why = f"perplexity ratio {r:.3f} >= {t.good:.2f}"
        elif level == "bad":
            why = f"perplexity ratio {r:.3f} < {t.bad:.2f}"
        else:
            why = f"perplexity ratio {r:.3f} is between {t.bad:.2f} and {t.good:.2f}"
        counts, not_counted = self._accuracy_counts()
        bound, ratio = self.accuracy_bound, self.accuracy_ratio
        if counts and bound is not None and ratio is not None:
            acc_level = t.level(bound)
            if _worse(level, acc_level) != level:
                limit = t.good if acc_level == "warn" else t.bad
                why += f"; accuracy ratio {ratio:.3f} (at most {bound:.3f} within two standard errors) < {limit:.2f}"
            else:
                why += f"; accuracy ratio {ratio:.3f} (up to {bound:.3f} within two standard errors) does not lower it"
        elif ratio is not None:
            why += f"; accuracy does not count: {not_counted}"
        return f"{self.judgement}: {why}"

    # -- output -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what ``report.html`` renders (``ReportData.verdict``)."""
        return {
            "judgement": self.judgement,
            "headline": self.headline,
            "kept": self.kept,
            "reason": self.reason,
            "thresholds": {"good": self.thresholds.good, "bad": self.thresholds.bad, "text": self.thresholds.describe()},
            "ppl_ratio": self.ppl_ratio,
            "ppl_ratios": self.ppl_ratios,
            "accuracy_ratio": self.accuracy_ratio,
            "accuracy_bound": self.accuracy_bound,
            "held_out": self.before.held_out,
            "size": self.before.size,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "speed": self.speed,
            "speed_note": self.speed_note,
        }

    def format(self) -> str:
        """The verdict as console text: headline, thresholds, per-source table, accuracy, generations, speed."""
        b, a = self.before, self.after
        acc = self.accuracy_ratio
        lines = [
            f"quality verdict: {self.judgement.upper()}, {self.headline} (perplexity ratio dense/pruned"
            + (f"; accuracy {acc:.1%} of dense" if acc is not None else "") + ")",
            f"  {self.reason}",
            f"  thresholds: {self.thresholds.describe()} (docs/evaluation.md)",
            f"  held-out: {b.held_out}; size {b.size}",
            f"  parameters: {b.params:,} -> {a.params:,} ({a.params / b.params:.1%})" if b.params else "",
            f"  {'source':<22}{'tokens':>8}{'dense ppl':>12}{'pruned ppl':>12}{'ratio':>8}",
        ]
        for s, ratio in self.ppl_ratios.items():
            lines.append(
                f"  {s:<22}{b.perplexity[s]['tokens']:>8}{b.perplexity[s]['ppl']:>12.2f}"
                f"{a.perplexity[s]['ppl']:>12.2f}{ratio:>8.3f}"
            )
        if b.tasks:
            lines.append(f"  {'task':<30}{'n':>5}{'dense acc (norm)':>20}{'pruned acc (norm)':>20}  by")
            for t, row in b.tasks.items():
                other = a.tasks.get(t, {})
                lines.append(
                    f"  {t:<30}{row.get('n') or '-':>5}{_acc(row):>20}{_acc(other):>20}  {row.get('by', '')}"
                )
            lines.append("  acc: the option with the highest summed log-probability; norm: acc_norm, that sum per "
                         "character of the option")  # fmt: skip
        after = {g["prompt"]: g["text"] for g in a.generations}
        for g in b.generations:
            lines += [f"  prompt {g['prompt']!r}", f"    dense:  {g['text']!r}", f"    pruned: {after.get(g['prompt'], '-')!r}"]
        lines.append(self.speed_text if self.speed_text else f"  speed: {self.speed_note}")
        lines.append(f"  measured in {b.seconds:.1f} s (dense) + {a.seconds:.1f} s (pruned)")
        return "\n".join(line for line in lines if line)


def _acc(row: Mapping[str, Any]) -> str:
    if row.get("accuracy") is None:
        return "-"
    norm = row.get("accuracy_norm")
    return f"{row['accuracy']:.3f}" + (f" ({norm:.3f})" if norm is not None else "")


def _config_facts(model: nn.Module) -> tuple[str, int | None]:
    """``(architecture, vocabulary size)`` as the config says, else the class and the embedding rows."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None) or type(model).__name__
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        vocab = getattr(emb, "num_embeddings", None)
    return str(arch), vocab


def check_comparable(dense: nn.Module, pruned: nn.Module, *, dense_tokenizer: Any = None,
                     tokenizer: Any = None, where: str = "--against") -> None:  # fmt: skip
    """Refuse to judge a model against a dense model it cannot have been pruned from (another
    architecture or vocabulary): perplexities over different tokens do not compare.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> a = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> b = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2))
        >>> check_comparable(a, b)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        shear.errors.InputError: --against: the dense model is a llama model with a 64-token vocabulary, ...
    """
    (arch_d, vocab_d), (arch_p, vocab_p) = _config_facts(dense), _config_facts(pruned)
    fix = (
        "the verdict compares a pruned model with the dense model it was pruned from: pass that model's folder "
        f"to {where}"
    )
    if arch_d != arch_p or vocab_d != vocab_p:
        raise InputError(
            f"{where}: the dense model is a {arch_d} model with a {vocab_d:,}-token vocabulary, the evaluated one a "
            f"{arch_p} model with {vocab_p:,} tokens; {fix}"
            if isinstance(vocab_d, int) and isinstance(vocab_p, int)
            else f"{where}: the dense model is a {arch_d} model, the evaluated one a {arch_p} model; {fix}"
        )
    if dense_tokenizer is not None and tokenizer is not None:
        get_d, get_p = getattr(dense_tokenizer, "get_vocab", None), getattr(tokenizer, "get_vocab", None)
        if callable(get_d) and callable(get_p) and get_d() != get_p():
            raise InputError(f"{where}: the two folders' tokenizers differ (their vocabularies are not the same); {fix}")


def compare_speed_lazily(dense: nn.Module | None, pruned: nn.Module, size: str | bool | EvalSize) -> tuple[Any, str]:
    """``(SpeedComparison or None, note)``: the speed comparison of ``shear.evaluation.speed`` on the pruned
    model's device (the dense one is moved there for the measurement and back) when that module is
    present and both models run; otherwise ``None`` and why."""
    if dense is None:
        return None, "not measured (no dense model to compare with: compile(inplace=True) transforms it)"
    try:
        speed = importlib.import_module("shear.evaluation.speed")
    except ModuleNotFoundError as e:
        if e.name != "shear.evaluation.speed":
            raise
        return None, "not measured (this shear has no shear.evaluation.speed)"
    s, where = eval_size(size), model_device(pruned)  # the dense model visits the pruned one's device
    try:
        return speed.compare_speed(dense, pruned, device=where, batches=s.speed_batches, repeats=s.speed_repeats), ""
    except Exception as e:  # noqa: BLE001 - the verdict stands without speed; say why it is missing
        return None, f"not measured ({type(e).__name__}: {e})"
