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

The full ``(batch, seq, vocab)`` fp32 logits of a large-vocabulary model are often the biggest
tensor of a LoRA step (4 x 2048 tokens x 152k vocab = 5 GB), held twice (logits and the softmax
saved for backward). :func:`chunked_causal_lm_loss_sum` never builds them: :func:`head_bypassed`
makes the model return its final hidden states, and the output head and cross-entropy then run
``chunk`` tokens at a time under activation checkpointing, so backward recomputes one chunk's
logits at a time. The sum and the gradients equal the full computation's (float rounding aside):

    >>> head = torch.nn.Linear(8, 5, bias=False)
    >>> hidden, labels = torch.randn(2, 6, 8), torch.randint(0, 5, (2, 6))
    >>> full = causal_lm_loss_sum(head(hidden), labels)
    >>> torch.allclose(chunked_causal_lm_loss_sum(hidden, head, labels, chunk=3), full, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from shear.errors import ModelError
from shear.model.facts import logits_of

__all__ = [
    "LOSS_CHUNK_TOKENS",
    "IGNORE_INDEX", "model_nll_sum", "causal_lm_loss_sum", "chunked_causal_lm_loss_sum", "count_targets", "forward_kwargs", "logits_of",
    "head_bypassed", "output_head", "PLAIN_HEAD_MODEL_TYPES", "LOGITS_CHUNK_ELEMENTS", "chunk_tokens",
]

IGNORE_INDEX = -100
"""Label of a position the loss skips (transformers' and torch's convention)."""

PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "opt", "phi3"})
"""``config.model_type`` of causal LMs whose logits are exactly ``output_embeddings(final hidden
states)``: no logit scale, soft-capping or bias added after the head, so the chunked loss may run
the head itself. Others (e.g. Gemma's soft-capping) keep the full-logits loss."""


def count_targets(labels: torch.Tensor) -> int:
    """Tokens that take a loss: labels shifted by one, not ``-100``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over the targets of ``labels`` (aligned with the inputs)."""
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].float().reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1).to(shifted.device)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under peft, DDP or accelerate wrappers."""
    for _ in range(8):
        inner = getattr(model, "get_base_model", None)
        nxt = inner() if callable(inner) else getattr(model, "module", None)
        if not isinstance(nxt, nn.Module):
            break
        model = nxt
    return model


def output_head(model: nn.Module) -> nn.Module | None:
    """The output head of ``model`` when the chunked loss may run it (a transformers causal LM of a
    :data:`PLAIN_HEAD_MODEL_TYPES` family, under any peft/DDP wrapper); ``None`` otherwise."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(lm, "get_output_embeddings"):
        return None
    head = getattr(lm, "get_output_embeddings")()  # noqa: B009 - transformers method, untyped here
    return head if isinstance(head, nn.Module) else None


def _owner(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in root.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ModelError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


@contextmanager
def head_bypassed(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the output head of ``model`` is an identity, so a forward call returns the
    final hidden states where the logits were; yields the head. The head is put back on exit, also
    after an error.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
        >>> with head_bypassed(lm) as head:
        ...     lm(torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 3, 16])
        >>> lm.lm_head is head
        True
    """
    head = output_head(model)
    if head is None:
        raise ModelError(f"{type(_causal_lm(model)).__name__} has no plain output head to bypass")
    owner, name = _owner(_causal_lm(model), head)
    setattr(owner, name, nn.Identity())
    try:
        yield head
    finally:
        setattr(owner, name, head)


class _SummedCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")`` in fp32 with
    one fp32 copy of the logits, worked in place, instead of three to four (the upcast, log-softmax's
    saved output, its gradient and the temporaries of its backward); backward recomputes the softmax
    from the saved (16-bit) logits and returns the gradient in their dtype."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        z = logits.to(torch.float32, copy=True)
        keep = targets != IGNORE_INDEX
        safe = torch.where(keep, targets, 0).unsqueeze(1)
        picked = z.gather(1, safe).squeeze(1)
        top = z.amax(dim=1, keepdim=True)
        lse = z.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
        ctx.save_for_backward(logits, lse, safe, keep)
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        logits, lse, safe, keep = ctx.saved_tensors
        z = logits.to(torch.float32, copy=True)
        z.sub_(lse.unsqueeze(1)).exp_()  # softmax
        z.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=z.dtype))
        z.mul_((grad * keep).unsqueeze(1).to(z.dtype))
        return z.to(logits.dtype), None


LOSS_CHUNK_TOKENS = 256
"""Most tokens whose logits a chunked loss computes at once (fewer for a large vocabulary:
:func:`chunk_tokens`): training chunks by this when ``loss_chunk_tokens="auto"`` chunks, and the
calibration loss of saliency always does."""

LOGITS_CHUNK_ELEMENTS = 256 * 32768
"""Most logits one chunk of the chunked loss computes: 256 tokens of a 32k vocabulary (32 MB in fp32);
a larger vocabulary gets fewer tokens per chunk (:func:`chunk_tokens`)."""


def chunk_tokens(chunk: int, head: nn.Module) -> int:
    """Tokens per chunk for ``head``: at most ``chunk``, and at most :data:`LOGITS_CHUNK_ELEMENTS`
    logits (at least 16 tokens), so a 128k vocabulary runs 65 tokens at a time, not 256.

    Example:
        >>> chunk_tokens(256, torch.nn.Linear(8, 128256, bias=False)), chunk_tokens(256, torch.nn.Linear(8, 32000))
        (65, 256)
    """
    weight = getattr(head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    return min(chunk, max(16, LOGITS_CHUNK_ELEMENTS // vocab)) if vocab else chunk


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    out = _SummedCrossEntropy.apply(head(hidden), targets)
    assert isinstance(out, torch.Tensor)
    return out


def chunked_causal_lm_loss_sum(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, chunk: int
) -> torch.Tensor:
    """:func:`causal_lm_loss_sum` of ``head(hidden)`` without the full logits: ``chunk`` tokens at a
    time, each recomputed in backward (activation checkpointing), so at most one chunk's logits
    exist at once. ``hidden`` is ``(batch, seq, d)``, ``labels`` ``(batch, seq)`` aligned with the inputs."""
    d = hidden.shape[-1]
    flat = hidden[:, :-1, :].reshape(-1, d)
    targets = labels[:, 1:].reshape(-1).to(flat.device)
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        piece = targets[start : start + chunk]
        part = flat[start : start + chunk]
        if torch.is_grad_enabled() and (part.requires_grad or any(p.requires_grad for p in head.parameters())):
            total = total + checkpoint(_chunk_loss, head, part, piece, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, part, piece)
    return total


def model_nll_sum(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, *, chunk: int, cap: bool = False
) -> torch.Tensor:
    """Summed next-token NLL (fp32) of causal LM ``model`` on ``ids`` ``[b, L]`` over the targets of
    ``labels`` (aligned with the inputs, ``-100`` not scored). Where the output head allows it
    (:func:`output_head`) the head and the loss run ``chunk`` tokens at a time (``cap``: at most
    :func:`chunk_tokens` for the head's vocabulary), so the fp32 logits are never held whole.

    Example:
        >>> model_nll_sum(model, ids, ids, chunk=256)   # doctest: +SKIP
        tensor(1234.5)
    """
    if output_head(model) is not None:
        with head_bypassed(model) as head:
            hidden = logits_of(model(input_ids=ids, use_cache=False))
        return chunked_causal_lm_loss_sum(hidden, head, labels, chunk=chunk_tokens(chunk, head) if cap else chunk)
    return causal_lm_loss_sum(logits_of(model(input_ids=ids, use_cache=False)), labels)


def forward_kwargs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of a causal LM's training forward for ``batch``: ids, the attention mask
    when there is one, and ``use_cache=False`` for models that keep a cache."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs
