"""Per-module-type rules that bring a module's attributes back in line with its (sliced) tensors.

Codegen slices parameters and buffers; modules also carry sizes as plain attributes
(``nn.Linear.in_features``, GPT-2 ``Conv1D.nf``, a LLaMA attention's ``num_key_value_groups``,
peft's ``LoraLayer.in_features``). A rule reads the module's *current* tensors (and its children,
which are updated first: the walk is post-order) and rewrites those attributes. Rules are the
``attributes`` facet of the one module table (:func:`shear.graph.modules.table.register_module`),
looked up along the MRO, then by structure, so a new architecture is a new entry::

    def _my_attention(m: MyAttention) -> None:
        m.num_heads = m.q.weight.shape[0] // m.head_dim

    register_module(MyAttention, attributes=_my_attention)   # or @register_module_rule(MyAttention)

How an RMS-style norm whose width shrinks is rescaled lives in :mod:`shear.graph.modules.norms`
(:func:`find_rms_norm`, re-exported here), which the analysis shares.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(4, 3)
    >>> lin.weight = torch.nn.Parameter(lin.weight[:2])
    >>> lin.bias = torch.nn.Parameter(lin.bias[:2])
    >>> update_module_attributes(lin)
    >>> lin.out_features
    2
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from shear.errors import GraphError
from shear.graph.modules.norms import RmsNormSpec, find_rms_norm, register_rms_norm
from shear.graph.modules.table import ModuleRule, PredicateView, lookup_module, register_module

__all__ = [
    "ModuleRule",
    "register_module_rule",
    "find_rule",
    "STRUCTURAL_RULES",
    "register_structural_rule",
    "hf_attention",
    "LayerConfig",
    "update_module_attributes",
    "RmsNormSpec",
    "register_rms_norm",
    "find_rms_norm",
    "in_out_features",
    "is_linear_like",
]

_M = TypeVar("_M", bound=ModuleRule)


def register_module_rule(*types: type) -> Callable[[_M], _M]:
    """Decorator: register ``fn`` as the attribute rule of each of ``types``: a thin wrapper over
    ``register_module(t, attributes=fn)``."""

    def deco(fn: _M) -> _M:
        for t in types:
            register_module(t, attributes=fn)
        return fn

    return deco


def _register_optional(module: str, names: tuple[str, ...], fn: ModuleRule) -> None:
    """Register ``fn`` for classes that exist in the installed version of an optional package."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    for name in names:
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            register_module(cls, attributes=fn)


STRUCTURAL_RULES = PredicateView("attributes", pairs=True)
"""Read-only view, newest first: (predicate, rule) pairs tried, in order, for a module whose type has
no rule: they recognise a family by its structure (any transformers attention with ``head_dim`` and
q/k/o projections). Derived from the module table."""


def register_structural_rule(predicate: Callable[[nn.Module], bool], rule: ModuleRule) -> None:
    """Apply ``rule`` to modules of unregistered types that match ``predicate`` (later wins): a thin
    wrapper over ``register_module(predicate, attributes=rule)``."""
    register_module(predicate, attributes=rule)


def find_rule(module: nn.Module) -> ModuleRule | None:
    """The rule for ``module``'s type, of its nearest registered base class, or of its structure."""
    rule: ModuleRule | None = lookup_module(module, "attributes")
    return rule


def update_module_attributes(model: nn.Module) -> None:
    """Run the rule of every module of ``model``, children before parents."""
    for child in model.children():
        update_module_attributes(child)
    rule = find_rule(model)
    if rule is not None:
        rule(model)


# --- torch.nn ------------------------------------------------------------------------------------


@register_module_rule(nn.Linear)
def _linear(m: nn.Module) -> None:
    m.out_features, m.in_features = (int(s) for s in m.weight.shape)


@register_module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Module) -> None:
    out_c, in_per_group = int(m.weight.shape[0]), int(m.weight.shape[1])
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels and in_per_group == 1
    if depthwise:
        m.groups = out_c
    if out_c % m.groups != 0:
        raise GraphError(
            f"Conv {m!r}: {out_c} output channels do not split into {m.groups} groups after erasure; "
            "grouped-conv channels must be pruned in whole groups (mark the space unprunable)"
        )
    m.out_channels = out_c
    m.in_channels = in_per_group * m.groups


@register_module_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(m: nn.Module) -> None:
    m.in_channels = int(m.weight.shape[0])
    m.out_channels = int(m.weight.shape[1]) * m.groups


def _first_tensor(m: nn.Module, *names: str) -> torch.Tensor | None:
    for name in names:
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


@register_module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d)
def _batchnorm(m: nn.Module) -> None:
    t = _first_tensor(m, "weight", "running_mean")
    if t is not None:
        m.num_features = int(t.shape[0])


@register_module_rule(nn.LayerNorm, nn.RMSNorm)
def _layernorm(m: nn.Module) -> None:
    t = m.weight if m.weight is not None else None
    if t is not None:
        m.normalized_shape = tuple(int(s) for s in t.shape)


@register_module_rule(nn.GroupNorm)
def _groupnorm(m: nn.Module) -> None:
    if m.weight is not None:
        m.num_channels = int(m.weight.shape[0])


@register_module_rule(nn.Embedding)
def _embedding(m: nn.Module) -> None:
    m.num_embeddings, m.embedding_dim = (int(s) for s in m.weight.shape)


@register_module_rule(nn.MultiheadAttention)
def _mha(m: nn.Module) -> None:
    # in_proj_weight is [3 * embed_dim, embed_dim]; torch derives head_dim from embed_dim // num_heads,
    # so only residual-width changes with whole heads kept are representable.
    if m.in_proj_weight is not None:
        m.embed_dim = int(m.in_proj_weight.shape[1])
        m.kdim = m.vdim = m.embed_dim
        m.head_dim = m.embed_dim // m.num_heads


# --- transformers --------------------------------------------------------------------------------


def _linear_base(m: nn.Module) -> nn.Module:
    while hasattr(m, "base_layer"):
        m = m.base_layer
    return m


def is_linear_like(m: nn.Module) -> bool:
    """A module with a 2-D ``weight`` (looking through peft wrappers): what :func:`in_out_features` reads."""
    w = getattr(_linear_base(m), "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2


def in_out_features(m: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module, looking through peft wrappers."""
    base = _linear_base(m)
    if not is_linear_like(base):
        raise GraphError(
            f"{type(base).__name__} is not a linear layer (no 2-D weight): no module rule knows its widths; "
            "register one with shear.codegen.module_rules.register_module_rule"
        )
    w = base.weight
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 linear stores [in, out]
        return int(w.shape[0]), int(w.shape[1])
    return int(w.shape[1]), int(w.shape[0])


def _conv1d(m: nn.Module) -> None:
    m.nx, m.nf = (int(s) for s in m.weight.shape)


def _heads(m: nn.Module, proj: str, head_dim: int) -> int:
    out = in_out_features(getattr(m, proj))[1]
    if out % head_dim:
        raise GraphError(
            f"{type(m).__name__}.{proj}: {out} output features are not whole heads of {head_dim}; "
            "attention must be pruned by whole heads"
        )
    return out // head_dim


def _fused_qkv_heads(m: nn.Module, out_proj: str) -> tuple[int, int]:
    """``(query heads, kv heads)`` of a fused ``qkv_proj`` (Phi-3): q width read off the output projection."""
    head_dim = int(m.head_dim)
    n_q = in_out_features(getattr(m, out_proj))[0] // head_dim
    rest = in_out_features(m.qkv_proj)[1] - n_q * head_dim
    if rest <= 0 or rest % (2 * head_dim):
        raise GraphError(
            f"{type(m).__name__}.qkv_proj: {rest} key/value features are not two equal sets of whole heads "
            f"of {head_dim}; attention must be pruned by whole kv-head families"
        )
    return n_q, rest // (2 * head_dim)


def hf_attention(m: nn.Module) -> None:
    """Head counts of a transformers decoder attention, read off its projections.

    Handles separate ``q_proj``/``k_proj`` and Phi-3's fused ``qkv_proj``. Every head-count attribute
    the module has is rewritten (``num_heads``, ``num_key_value_heads``, ``num_key_value_groups``);
    a module that reads head counts from ``self.config`` (Phi-3 slices its fused projection at
    ``config.num_attention_heads * head_dim``) gets a :class:`LayerConfig` with its own counts,
    since pruned layers differ.
    """
    if hasattr(m, "qkv_proj"):
        n_q, n_kv = _fused_qkv_heads(m, "o_proj" if hasattr(m, "o_proj") else "out_proj")
    else:
        head_dim = int(m.head_dim)
        n_q, n_kv = _heads(m, "q_proj", head_dim), _heads(m, "k_proj", head_dim)
    if n_kv == 0 or n_q % n_kv:
        raise GraphError(
            f"{type(m).__name__}: {n_q} query heads do not split evenly over {n_kv} kv heads after erasure; "
            "prune GQA by kv-head families (a kv head with its query heads)"
        )
    if hasattr(m, "num_key_value_groups"):
        m.num_key_value_groups = n_q // n_kv
    for attr, value in (("num_heads", n_q), ("num_attention_heads", n_q), ("num_key_value_heads", n_kv)):
        if hasattr(m, attr):
            setattr(m, attr, value)
    config = getattr(m, "config", None)
    counts = {k: v for k, v in (("num_attention_heads", n_q), ("num_key_value_heads", n_kv)) if hasattr(config, k)}
    if config is not None and any(getattr(config, k) != v for k, v in counts.items()):
        m.config = LayerConfig(config.base if isinstance(config, LayerConfig) else config, **counts)


class LayerConfig:
    """A model config as one pruned layer sees it: its own head counts, every other field read
    through to the shared config (so ``set_attn_implementation`` still reaches the layer).

    Example:
        >>> from types import SimpleNamespace
        >>> shared = SimpleNamespace(num_attention_heads=8, _attn_implementation="eager")
        >>> mine = LayerConfig(shared, num_attention_heads=6)
        >>> shared._attn_implementation = "sdpa"
        >>> mine.num_attention_heads, mine._attn_implementation, shared.num_attention_heads
        (6, 'sdpa', 8)
    """

    def __init__(self, base: Any, **overrides: Any) -> None:
        self.__dict__["base"] = base
        self.__dict__["overrides"] = dict(overrides)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "overrides"):
            raise AttributeError(name)  # copy/pickle probe dunders before __dict__ is filled
        overrides = self.__dict__["overrides"]
        return overrides[name] if name in overrides else getattr(self.__dict__["base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.overrides:
            self.overrides[name] = value
        else:
            setattr(self.base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.base).__name__}, {self.overrides})"


def _is_hf_attention(m: nn.Module) -> bool:
    """A transformers attention by structure: ``head_dim`` plus q/k/o (``o_proj`` or GPT-J's
    ``out_proj``) or fused qkv/o projections."""
    projections = [getattr(m, n) for n in ("q_proj", "k_proj", "qkv_proj", "o_proj", "out_proj") if hasattr(m, n)]
    return (
        type(m).__name__.endswith("Attention")
        and isinstance(getattr(m, "head_dim", None), int)
        and (hasattr(m, "o_proj") or hasattr(m, "out_proj"))
        and (hasattr(m, "qkv_proj") or (hasattr(m, "q_proj") and hasattr(m, "k_proj")))
        and all(isinstance(p, nn.Module) and is_linear_like(p) for p in projections)  # Moshi's per-codebook linears are not
    )


def _llama_mlp(m: nn.Module) -> None:
    hidden, inter = in_out_features(m.gate_proj)
    m.hidden_size, m.intermediate_size = hidden, inter


def _gpt2_attention(m: nn.Module) -> None:
    fused = 2 if getattr(m, "is_cross_attention", False) else 3
    out = in_out_features(m.c_attn)[1]
    if out % (fused * m.head_dim):
        raise GraphError(f"GPT2Attention: c_attn width {out} is not {fused} x whole heads of {m.head_dim}")
    m.num_heads = out // (fused * m.head_dim)
    m.split_size = m.num_heads * m.head_dim
    m.embed_dim = in_out_features(m.c_proj)[1]


def _opt_attention(m: nn.Module) -> None:
    m.num_heads = _heads(m, "q_proj", m.head_dim)
    m.embed_dim = in_out_features(m.out_proj)[1]


def _bert_self_attention(m: nn.Module) -> None:
    m.num_attention_heads = _heads(m, "query", m.attention_head_size)
    m.all_head_size = m.num_attention_heads * m.attention_head_size


def _peft_lora_layer(m: nn.Module) -> None:
    m.in_features, m.out_features = in_out_features(m)


_LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "olmo", "olmo2")
for _family in _LLAMA_LIKE:
    _cap = {"qwen2": "Qwen2", "qwen3": "Qwen3", "olmo": "Olmo", "olmo2": "Olmo2"}.get(
        _family, _family.capitalize()
    )
    _register_optional(f"transformers.models.{_family}.modeling_{_family}", (f"{_cap}Attention",), hf_attention)
    _register_optional(f"transformers.models.{_family}.modeling_{_family}", (f"{_cap}MLP",), _llama_mlp)
register_structural_rule(_is_hf_attention, hf_attention)
_register_optional("transformers.pytorch_utils", ("Conv1D",), _conv1d)
_register_optional("transformers.models.gpt2.modeling_gpt2", ("GPT2Attention",), _gpt2_attention)
_register_optional("transformers.models.opt.modeling_opt", ("OPTAttention",), _opt_attention)
_register_optional(
    "transformers.models.bert.modeling_bert", ("BertSelfAttention", "BertSdpaSelfAttention"), _bert_self_attention
)
_register_optional("peft.tuners.lora.layer", ("LoraLayer",), _peft_lora_layer)
