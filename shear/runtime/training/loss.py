"""The training loss: re-exports :mod:`shear.runtime.lm_loss`, where the causal-LM losses live so that
the kernels below training (saliency's calibration loss) use the same chunked loss.

Example:
    >>> from shear.runtime.training.loss import chunked_causal_lm_loss_sum, count_targets
    >>> import torch
    >>> count_targets(torch.tensor([[1, 2, -100]]))
    1
"""

from __future__ import annotations

from shear.runtime.lm_loss import (  # noqa: F401 (re-exports)
    IGNORE_INDEX,
    LOGITS_CHUNK_ELEMENTS,
    PLAIN_HEAD_MODEL_TYPES,
    _causal_lm,
    causal_lm_loss_sum,
    chunk_tokens,
    chunked_causal_lm_loss_sum,
    count_targets,
    forward_kwargs,
    head_bypassed,
    logits_of,
    output_head,
)

__all__ = [
    "causal_lm_loss_sum", "chunked_causal_lm_loss_sum", "count_targets", "forward_kwargs", "logits_of",
    "head_bypassed", "output_head", "PLAIN_HEAD_MODEL_TYPES", "LOGITS_CHUNK_ELEMENTS", "chunk_tokens",
]
