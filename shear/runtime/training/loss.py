"""The causal-LM loss as a *sum* over target tokens, so steps weigh every token alike.

Averaging per micro-batch would weigh a short instruction batch like a long one; the loop instead
sums the token losses of all micro-batches (and ranks) of a step and divides once by their total
count, which makes gradient accumulation over 2 x B rows equal one batch of 2B rows.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 5)
    >>> labels = torch.tensor([[1, 2, -100]])
    >>> count_targets(labels)
    1
    >>> round(causal_lm_loss_sum(logits, labels).item(), 4)   # log(5) for the one target
    1.6094
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from shear.runtime.training.batches import IGNORE_INDEX

__all__ = ["causal_lm_loss_sum", "count_targets", "logits_of"]


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that take a loss: labels shifted by one, not ``-100``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over the targets of ``labels`` (aligned with the inputs)."""
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].float().reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1).to(shifted.device)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: ``.logits``, the first element of a tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
