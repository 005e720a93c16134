"""Logit distillation from the dense teacher: cross-entropy and a temperature-scaled KL, chunked.

The pruned student learns from the labels and from the dense model's next-token distribution
(Minitron's recipe; LoRAShear and LLM-Pruner fine-tune on labels only). Per target token:

    loss = (1 - weight) * CE(student, label) + weight * T^2 * KL(softmax(t / T) || softmax(s / T))

``weight=1`` is pure distillation, ``weight=0`` plain fine-tuning. The teacher runs without
gradient in its own dtype; only the student's trainable parameters (LoRA) get gradients. Like
:func:`~shear.kernels.losses.chunked_causal_lm_loss_sum`, neither model's full
``(batch, seq, vocab)`` logits are built: both return their final hidden states, and the heads,
the softmaxes and the KL run ``chunk`` tokens at a time, recomputed in backward.

Example:
    >>> head = torch.nn.Linear(8, 5, bias=False)
    >>> hidden, labels = torch.randn(2, 6, 8), torch.randint(0, 5, (2, 6))
    >>> ce, kl = chunked_distill_sums(hidden, head, hidden, head, labels, chunk=4, temperature=2.0)
    >>> round(kl.item(), 6)          # a student equal to its teacher
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from shear.errors import TrainingError
from shear.kernels.losses import count_targets, forward_kwargs, head_bypassed, logits_of, output_head
from shear.training.batches import IGNORE_INDEX

__all__ = ["DistillLoss", "chunked_distill_sums", "check_distill_options"]


def check_distill_options(owner: str, weight: float, temperature: float) -> None:
    """Raise a TrainingError naming ``owner`` when the distillation options are out of range."""
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise TrainingError(f"{owner}: distill must be in [0, 1] (0 = off, 1 = KL only), got {weight}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise TrainingError(f"{owner}: distill_temperature must be > 0, got {temperature}")


def _chunk_sums(
    head: nn.Module, part: torch.Tensor, t_head: nn.Module, t_part: torch.Tensor, targets: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    logits = head(part).float()
    with torch.no_grad():
        t_logits = t_head(t_part).float()
    keep = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    s_log = F.log_softmax(logits[keep] / temperature, dim=-1)
    t_log = F.log_softmax(t_logits[keep] / temperature, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum()
    return torch.stack([ce, kl])


def chunked_distill_sums(
    hidden: torch.Tensor,
    head: nn.Module,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    labels: torch.Tensor,
    *,
    chunk: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and summed ``KL(teacher || student)`` at temperature ``T``
    over the target tokens of ``labels`` (``(batch, seq)``, aligned with the inputs), ``chunk``
    tokens at a time. ``hidden`` / ``teacher_hidden`` are the final hidden states ``(batch, seq, d)``
    of the student and the teacher (their widths may differ); the teacher side takes no gradient."""
    flat = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    t_flat = teacher_hidden[:, :-1, :].reshape(-1, teacher_hidden.shape[-1]).detach()
    targets = labels[:, 1:].reshape(-1).to(flat.device)
    total = flat.new_zeros(2, dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        args = (head, flat[start : start + chunk], teacher_head, t_flat[start : start + chunk],
                targets[start : start + chunk], temperature)
        if torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head.parameters())):
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    return total[0], total[1]


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@dataclass
class DistillLoss:
    """A :data:`~shear.training.loop.LossFn` for :func:`~shear.training.train`: the
    mean over target tokens of ``(1 - weight) * CE + weight * T^2 * KL`` against ``teacher``.

    The teacher runs in eval mode under ``torch.no_grad()`` (its own flags are left as they were, as
    it is usually the caller's model), on the student's inputs. Models whose head may not be run alone (see
    :data:`~shear.kernels.losses.PLAIN_HEAD_MODEL_TYPES`) fall back to full logits.
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 1.0
    chunk: int = 256

    def __post_init__(self) -> None:
        check_distill_options("DistillLoss", self.weight, self.temperature)

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        n = max(count_targets(labels), 1)
        ce, kl = self.sums(model, batch)
        t2 = self.temperature**2
        return ((1.0 - self.weight) * ce + self.weight * t2 * kl) / n

    def sums(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and KL of one micro-batch."""
        labels = batch["labels"]
        plain = output_head(model) is not None and output_head(self.teacher) is not None
        if plain:
            with torch.no_grad(), _eval(self.teacher), head_bypassed(self.teacher) as t_head:
                t_hidden = logits_of(self.teacher(**forward_kwargs(self.teacher, batch)))
            with head_bypassed(model) as head:
                hidden = logits_of(model(**forward_kwargs(model, batch)))
            return chunked_distill_sums(hidden, head, t_hidden, t_head, labels, chunk=self.chunk,
                                        temperature=self.temperature)
        with torch.no_grad(), _eval(self.teacher):
            t_logits = logits_of(self.teacher(**forward_kwargs(self.teacher, batch)))
        logits = logits_of(model(**forward_kwargs(model, batch)))
        ident = nn.Identity()
        return chunked_distill_sums(logits, ident, t_logits, ident, labels, chunk=self.chunk,
                                    temperature=self.temperature)
