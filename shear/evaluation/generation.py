"""Greedy generation for before/after comparisons (deterministic, no sampling).

Example:
    >>> greedy_generate(model, tokenizer, "The capital of France is", max_new_tokens=8)  # doctest: +SKIP
    ' Paris.'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shear.model.devices import model_device

__all__ = ["greedy_generate"]


@torch.inference_mode()
def greedy_generate(
    model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40, chat: bool = False
) -> str:
    """The greedy continuation of ``prompt`` (only the new text). ``chat`` applies the chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
