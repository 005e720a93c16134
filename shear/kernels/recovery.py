"""The arithmetic of dynamic knowledge recovery (LoRAShear Algorithm 5), free of any pass machinery.

* :func:`degradation` — how much worse each source got: ``log(ppl_pruned) - log(ppl_dense)``, the
  excess next-token loss in nats per token (0 = as good as dense; negative = better than dense);
* :func:`source_weights` — the next round's sampling mixture from the degradations: every source
  keeps a floor share, the rest goes by ``softmax(d / temperature)`` or in proportion to ``d``;
* :func:`relative_gain` / :func:`mean_log` — relative change of a metric; the mean validation log-ppl;
* :func:`perplexity_gain` / :class:`Patience` — the stopping rule: a stage stops once ``patience``
  rounds in a row lowered perplexity by less than ``min_gain`` from the last round that did;
* :func:`instruction_loss` — mean response-token NLL of instruction examples (labels -100 on the prompt);

Example:
    >>> d = degradation({"a": 40.0, "b": 20.0}, {"a": 20.0, "b": 20.0})
    >>> round(d["a"], 3), d["b"]
    (0.693, 0.0)
    >>> w = source_weights(d, floor=0.5, temperature=0.25)
    >>> round(w["a"], 3), round(w["b"], 3), w["b"] >= 0.5 / 2
    (0.721, 0.279, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from shear.errors import DataError, KernelError
from shear.model.devices import model_device

__all__ = [
    "WeightMode",
    "degradation",
    "source_weights",
    "mean_log",
    "relative_gain",
    "perplexity_gain",
    "Patience",
    "instruction_loss",
]

WeightMode = Literal["softmax", "proportional"]
"""How the non-floor share of the mixture follows the degradations."""


def degradation(pruned: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """``log(ppl_pruned_s) - log(ppl_dense_s)`` per source of ``pruned`` (``inf`` for a non-finite ppl).

    The log ratio is the excess mean next-token loss in nats, so it compares across sources whose
    dense perplexities differ by an order of magnitude (a ratio, not a difference of perplexities),
    and a source that pruning left as good as dense scores 0.
    """
    missing = sorted(set(pruned) - set(dense))
    if missing:
        raise DataError(f"no dense perplexity for sources {missing}; the dense reference covers {sorted(dense)}")
    out = {}
    for name, ppl in pruned.items():
        ref = dense[name]
        if not (math.isfinite(ref) and ref > 0):
            raise DataError(f"the dense perplexity of source {name!r} is {ref}; it must be a finite number > 0")
        out[name] = math.log(ppl) - math.log(ref) if math.isfinite(ppl) and ppl > 0 else math.inf
    return out


def source_weights(
    degradations: Mapping[str, float],
    *,
    floor: float = 0.5,
    temperature: float = 0.25,
    mode: WeightMode = "softmax",
) -> dict[str, float]:
    """The sampling mixture for the next round: ``floor / S + (1 - floor) * p_s``, summing to 1.

    ``floor`` is the share of the samples spread uniformly (each of the ``S`` sources gets at least
    ``floor / S``: no source starves, so the least degraded ones are not forgotten); the remaining
    ``1 - floor`` follows ``p``:

    * ``mode="softmax"``: ``p = softmax(d / temperature)`` — shift-invariant (equal degradations give a
      uniform mixture, whatever their size) and sharper where sources differ by more than
      ``temperature`` nats; a source ``temperature`` nats more degraded than another gets ``e`` times
      its dynamic share;
    * ``mode="proportional"``: ``p = max(d, 0) / sum(max(d, 0))`` — scale-free; sources no worse than
      dense get the floor only; all ``d <= 0`` gives a uniform mixture.

    Non-finite degradations (a source whose ppl overflowed) take the whole dynamic share, evenly.
    The result is monotone in each degradation: a more degraded source never gets less.

    Example:
        >>> source_weights({"a": 0.3, "b": 0.3, "c": 0.3})
        {'a': 0.3333333333333333, 'b': 0.3333333333333333, 'c': 0.3333333333333333}
        >>> source_weights({"a": 1.0, "b": 0.0}, floor=0.2, mode="proportional")
        {'a': 0.9, 'b': 0.1}
    """
    check_weight_options(floor, temperature, mode)
    names = list(degradations)
    if not names:
        raise DataError("source_weights needs at least one source")
    d = [float(degradations[n]) for n in names]
    if any(math.isnan(x) for x in d):
        raise DataError(f"degradations contain NaN: {dict(zip(names, d))}")
    s = len(names)
    infinite = [x == math.inf for x in d]
    if any(infinite):
        p = [1.0 / sum(infinite) if i else 0.0 for i in infinite]
    elif mode == "softmax":
        t = torch.tensor(d, dtype=torch.float64) / temperature
        p = torch.softmax(t, dim=0).tolist()
    else:
        pos = [max(x, 0.0) for x in d]
        total = sum(pos)
        p = [x / total for x in pos] if total > 0 else [1.0 / s] * s
    w = [floor / s + (1.0 - floor) * q for q in p]
    total = sum(w)
    return {n: x / total for n, x in zip(names, w)}


def check_weight_options(floor: float, temperature: float, mode: str) -> None:
    """KernelError for a ``floor`` outside [0, 1], a ``temperature`` <= 0, or an unknown ``mode``."""
    if not (isinstance(floor, (int, float)) and 0.0 <= floor <= 1.0):
        raise KernelError(
            f"floor must be in [0, 1] (the share of samples spread uniformly over the sources), got {floor!r}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise KernelError(f"temperature must be a finite number > 0 (nats), got {temperature!r}")
    if mode not in ("softmax", "proportional"):
        raise KernelError(f"weights must be 'softmax' or 'proportional', got {mode!r}")


def mean_log(ppl: Mapping[str, float]) -> float:
    """Mean of ``log(ppl_s)`` over the sources (``exp`` of it is the geometric-mean perplexity)."""
    if not ppl:
        raise DataError("mean_log needs at least one source perplexity")
    vals = [math.log(p) if math.isfinite(p) and p > 0 else math.inf for p in ppl.values()]
    return sum(vals) / len(vals)


def relative_gain(before: float, after: float) -> float:
    """``(before - after) / |before|``: the share a lower-is-better metric improved (negative: worse).

    Example:
        >>> round(relative_gain(4.0, 3.9), 6)
        0.025
    """
    if not math.isfinite(before):
        return math.inf if math.isfinite(after) else 0.0
    if not math.isfinite(after):
        return -math.inf
    if before == 0:
        return 0.0 if after == 0 else -math.inf
    return (before - after) / abs(before)


def perplexity_gain(before: float, after: float) -> float:
    """Share by which perplexity fell from ``exp(before)`` to ``exp(after)``, for log-perplexities (a mean
    validation log-ppl, a mean NLL): ``1 - exp(after - before)``; negative when it rose.

    Example:
        >>> round(perplexity_gain(math.log(100.0), math.log(99.0)), 6)
        0.01
    """
    if not math.isfinite(before):
        return math.inf if math.isfinite(after) else 0.0
    if not math.isfinite(after):
        return -math.inf
    return -math.expm1(after - before)


class Patience:
    """Early stopping on a log-perplexity across rounds: a round *improves* when perplexity fell by at
    least ``min_gain`` (a share) from the reference, the last round that improved (or the start);
    :meth:`update` says to stop once ``patience`` rounds in a row did not. Small gains add up: two
    rounds of 0.3% each are one 0.6% improvement against the reference.

    Example:
        >>> rule = Patience(math.log(100.0), min_gain=0.005, patience=2)
        >>> [rule.update(math.log(p)) for p in (90.0, 89.8, 89.7, 89.6)]
        [False, False, True, True]
        >>> rule.stale, round(math.exp(rule.reference), 1)
        (3, 90.0)
    """

    def __init__(self, start: float, *, min_gain: float, patience: int) -> None:
        if patience < 1:
            raise KernelError(f"patience must be >= 1 (rounds without a gain before stopping), got {patience!r}")
        if not (math.isfinite(min_gain) and min_gain >= 0):
            raise KernelError(f"min_gain must be a share >= 0 (e.g. 0.005), got {min_gain!r}")
        self.reference, self.min_gain, self.patience, self.stale = start, min_gain, patience, 0

    def update(self, metric: float) -> bool:
        """Count a round that ended at ``metric`` (the kept model's); True when the stage should stop."""
        if perplexity_gain(self.reference, metric) >= self.min_gain and math.isfinite(metric):
            self.reference, self.stale = metric, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@torch.no_grad()
def instruction_loss(
    model: nn.Module,
    examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> float:
    """Mean next-token NLL over the response tokens (labels != -100) of ``examples``, padded right.

    Example:
        >>> instruction_loss(model, data.instructions_val, pad_id=0)   # doctest: +SKIP
        3.21
    """
    if not examples:
        raise DataError("instruction_loss got no examples; TextData.from_corpus(..., instructions=N) adds some")
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            width = max(int(ids.numel()) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):
                n = int(x.numel())
                ids[row, :n], labels[row, :n], mask[row, :n] = x, y, 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            target = labels[:, 1:].reshape(-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), target, ignore_index=-100, reduction="sum"
            )
            nll += float(loss)
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the instruction examples have no response tokens (all labels are -100)")
    return nll / count
