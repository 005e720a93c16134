"""After erasing experts: the config fields and module attributes an MoE model reads its counts from.

- :func:`moe_sizes` gives the config fields of a model whose MoE layers all keep the same number
  of experts and channels, named by the table (:mod:`shear.graph.modules.experts`:
  ``num_local_experts`` for all three, Mixtral's and gpt-oss's ``intermediate_size``, Qwen3-MoE's
  ``moe_intermediate_size`` plus ``intermediate_size`` of its dense layers);
  :func:`shear.codegen.hf_config.refresh_config`
  then tests that the config rebuilds the model. Layers that differ leave the config as it was and
  :func:`shear.load` rebuilds them from the tensor shapes.
- ``attributes`` rules: peft's ``ParamWrapper`` (LoRA on a fused expert tensor) reads
  ``num_experts`` and its in/out features off the wrapped tensor; the causal-LM classes keep their
  own ``num_experts`` (the load-balancing loss reads it) when every layer agrees.

Example:
    >>> import torch
    >>> moe_sizes(torch.nn.Linear(2, 2)) is None
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from shear.codegen.module_rules import in_out_features
from shear.graph.expert_groups import moe_blocks
from shear.graph.modules.table import register_module

__all__ = ["moe_sizes", "expert_counts"]


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def expert_counts(model: nn.Module) -> list[int]:
    """Experts per MoE layer of ``model``, in module order (empty without known MoE layers)."""
    return [b.spec.experts(model.get_submodule(b.experts)) for b in moe_blocks(model)]


def moe_sizes(base: nn.Module) -> dict[str, Any] | None:
    """Config fields for the expert count and width (and the dense MLP width of layers without
    experts), or None when the model has no known MoE layer or its layers differ."""
    blocks = moe_blocks(base)
    if not blocks:
        return None
    spec = blocks[0].spec
    experts = [base.get_submodule(b.experts) for b in blocks]
    count, width = _uniform([spec.experts(m) for m in experts]), _uniform([spec.channels(m) for m in experts])
    if count is None or width is None or any(b.spec != spec for b in blocks):
        return None
    out: dict[str, Any] = {spec.count_field: count, spec.channel_field: width}
    moe = {b.block for b in blocks}
    dense = [in_out_features(m.gate_proj)[1] for n, m in base.named_modules()
             if n not in moe and n.endswith(".mlp") and hasattr(m, "gate_proj")]  # fmt: skip
    if dense:
        inter = _uniform(dense)
        if inter is None:
            return None
        out["intermediate_size"] = inter
    return out


def _param_wrapper(m: Any) -> None:
    """peft ``ParamWrapper``: LoRA ``A [r*E, in]``, ``B [out, r*E]`` on a fused ``[E, ., .]`` tensor."""
    shape = tuple(int(s) for s in m.get_param().shape)
    if len(shape) != 3:
        m.in_features, m.out_features = shape[1], shape[0]
        return
    transposed = bool(getattr(m.get_base_layer(), "is_transposed", False))
    m.num_experts = shape[0]
    m.in_features, m.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])


def _causal_lm(m: nn.Module) -> None:
    count = _uniform(expert_counts(m))
    if count is not None and hasattr(m, "num_experts"):
        setattr(m, "num_experts", count)  # noqa: B010 - an attribute of the transformers class, untyped here


def _optional(module: str, name: str) -> Any:
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) else None


for _module, _name, _rule in (
    ("peft.tuners.lora.layer", "ParamWrapper", _param_wrapper),
    ("transformers.models.mixtral.modeling_mixtral", "MixtralForCausalLM", _causal_lm),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeForCausalLM", _causal_lm),
    ("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssForCausalLM", _causal_lm),
):
    _cls = _optional(_module, _name)
    if _cls is not None:
        register_module(_cls, attributes=_rule)
