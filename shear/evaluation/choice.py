"""Multiple-choice scoring by log-likelihood: the option the model finds most likely wins.

Like lm-eval-harness: context and option are tokenized separately and concatenated; the score
of an option is the summed log-probability of its tokens given the context. ``accuracy`` uses
the raw sum, ``accuracy_norm`` divides it by the option's length in characters.

Example:
    >>> from shear.data import next_line_task                       # doctest: +SKIP
    >>> r = score_choices(model, tokenizer, next_line_task("kjv"))   # doctest: +SKIP
    >>> r.accuracy > 0.25                                            # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from shear.errors import DataError
from shear.model.devices import model_device

__all__ = ["ChoiceResult", "MultipleChoice", "option_logprobs", "score_choices"]


class MultipleChoice(NamedTuple):
    """A question (built by :mod:`shear.data.tasks`, or your own): score ``context + option`` for each option; ``answer`` indexes the right one."""

    context: str
    options: tuple[str, ...]
    answer: int
    task: str


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy of a model on a list of multiple-choice items."""

    task: str
    n: int
    accuracy: float
    accuracy_norm: float
    chance: float
    seconds: float
    predictions: tuple[int, ...]


@torch.inference_mode()
def option_logprobs(model: nn.Module, tokenizer: Any, item: MultipleChoice) -> list[float]:
    """Summed log-probability of each option's tokens given the item's context."""
    ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    opts = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in item.options]
    if not ctx or any(not o for o in opts):
        raise DataError(f"{item.task}: an empty context or option cannot be scored: {item.context[:60]!r}")
    seqs = [ctx + o for o in opts]
    length = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    batch = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    scores = []
    for i, o in enumerate(opts):
        positions = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(o))
        scores.append(float(logp[i, positions, torch.tensor(o)].sum()))
    return scores


def score_choices(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[MultipleChoice],
    *,
    progress: Callable[[int], None] | None = None,
) -> ChoiceResult:
    """Accuracy (raw and length-normalised) of ``model`` on ``items``."""
    if not items:
        raise DataError("score_choices got no items; build some with shear.data.next_line_task(...).")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    correct = correct_norm = 0
    predictions = []
    try:
        for item in items:
            scores = option_logprobs(model, tokenizer, item)
            pred = max(range(len(scores)), key=scores.__getitem__)
            norm = [s / max(1, len(o)) for s, o in zip(scores, item.options, strict=True)]
            pred_norm = max(range(len(norm)), key=norm.__getitem__)
            correct += pred == item.answer
            correct_norm += pred_norm == item.answer
            predictions.append(pred)
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    n = len(items)
    chance = sum(1 / len(i.options) for i in items) / n
    return ChoiceResult(
        items[0].task,
        n,
        correct / n,
        correct_norm / n,
        chance,
        time.perf_counter() - start,
        tuple(predictions),
    )
