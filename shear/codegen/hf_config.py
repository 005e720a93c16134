"""Keep a transformers config in line with a pruned model, where the architecture allows.

After erasure the per-layer sizes live in the tensors. When every layer has the same sizes, the
config can say so (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
``hidden_size``, ``head_dim`` set explicitly, ``rms_norm_eps`` rescaled) and a plain
``from_pretrained`` rebuilds the model. Whether it does is *tested*, not assumed: the candidate
config builds a skeleton on the meta device and its tensor shapes must equal the model's
(transformers 5 validates head counts strictly, e.g. LLaMA requires hidden_size % heads == 0).
Otherwise the config keeps its original sizes and only :func:`shear.io.checkpoint.load`,
which reads per-tensor shapes, rebuilds the model; :func:`unloadable_config` then gives the
``config.json`` that makes a plain ``from_pretrained`` fail with a message naming ``shear.load``
instead of a size mismatch deep in the weights.

Example:
    >>> import torch
    >>> refresh_config(torch.nn.Linear(2, 2))   # not a transformers model: nothing to do
    False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from shear.codegen.module_rules import in_out_features
from shear.codegen.moe_config import moe_sizes
from shear.model.facts import base_weight_name, is_lora_param

__all__ = [
    "CONFIG_RULES",
    "LayerWidths",
    "POSITION_FIELDS",
    "UNLOADABLE_FIELDS",
    "hf_base_model",
    "layer_widths",
    "max_positions",
    "candidate_config_updates",
    "refresh_config",
    "skeleton_shapes",
    "unloadable_config",
]


def hf_base_model(model: nn.Module) -> nn.Module | None:
    """The transformers ``PreTrainedModel`` inside ``model`` (looking through a PeftModel), or None."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    if getattr(base, "config", None) is None or not hasattr(base, "_from_config"):
        return None
    return base


POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
"""Config fields that bound the sequence length, tried in order."""


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts by its transformers config, or None when unbounded/unknown.

    A model is bounded when it indexes a position table: learned absolute position embeddings
    (GPT-2, OPT, BERT) or a precomputed buffer with one row per position (GPT-J's
    ``embed_positions``). A rotary model that computes its angles extrapolates past
    ``max_position_embeddings``, so it is not held to it.
    """
    base = hf_base_model(model)
    if base is None:
        return None
    limit = next((v for f in POSITION_FIELDS if isinstance(v := getattr(base.config, f, None), int) and v > 0), None)
    if limit is None:
        return None
    learned = any(
        isinstance(m, nn.Embedding) and ("position" in n.rsplit(".", 1)[-1] or n.rsplit(".", 1)[-1] == "wpe")
        for n, m in base.named_modules()
    )
    table = any("position" in n.rsplit(".", 1)[-1] and b.dim() >= 1 and b.shape[0] == limit
                for n, b in base.named_buffers())  # fmt: skip
    return limit if learned or table else None


def _uniform(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


@dataclass(frozen=True)
class LayerWidths:
    """The widths one LLaMA-family decoder layer kept: query and kv heads, head size, MLP channels."""

    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int


def layer_widths(model: nn.Module) -> list[LayerWidths] | None:
    """Per-layer widths of a LLaMA-family model (``model.layers[i].self_attn``/``.mlp``, looking
    through a PeftModel), or None for other layouts. An erased attention or MLP block
    (:class:`~shear.model.blocks.RemovedBranch`) has widths 0.

    Example:
        >>> layer_widths(torch.nn.Linear(2, 2)) is None
        True
    """
    base = hf_base_model(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if base is None or layers is None:
        return None
    from shear.model.blocks import RemovedBranch

    out = []
    try:
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            n_q = n_kv = hd = 0
            if not isinstance(attn, RemovedBranch):  # an erased block keeps no widths: 0
                hd = int(attn.head_dim)
                n_q, n_kv = in_out_features(attn.q_proj)[1] // hd, in_out_features(attn.k_proj)[1] // hd
            n_ff = 0 if isinstance(mlp, RemovedBranch) else in_out_features(mlp.gate_proj)[1]
            out.append(LayerWidths(n_q, n_kv, hd, n_ff))
    except AttributeError:
        return None
    return out


def _gated_mlp(base: nn.Module) -> dict[str, Any] | None:
    inter = _uniform([in_out_features(layer.mlp.gate_proj)[1] for layer in base.model.layers])
    return None if inter is None else {"intermediate_size": inter}


def _llama_like(base: nn.Module, mlp: Callable[[nn.Module], dict[str, Any] | None] = _gated_mlp) -> dict[str, Any] | None:
    layers = base.model.layers
    attn = [layer.self_attn for layer in layers]
    hd = _uniform([a.head_dim for a in attn])
    n_q = _uniform([in_out_features(a.q_proj)[1] // a.head_dim for a in attn])
    n_kv = _uniform([in_out_features(a.k_proj)[1] // a.head_dim for a in attn])
    mlp_sizes = mlp(base)  # the MLP's fields: intermediate_size, or an MoE's expert counts (moe_sizes)
    epsilons = [m.variance_epsilon for m in base.modules() if hasattr(m, "variance_epsilon")]
    eps = _uniform(epsilons)
    if None in (hd, n_q, n_kv, mlp_sizes) or (epsilons and eps is None):
        return None  # e.g. Qwen3: a pruned residual rescales its norms' eps, the per-head q/k norms keep theirs
    out = {
        "hidden_size": int(base.model.embed_tokens.weight.shape[1]),
        "num_attention_heads": n_q,
        "num_key_value_heads": n_kv,
        "head_dim": hd,
        **(mlp_sizes or {}),
    }
    if eps is not None:
        out["rms_norm_eps"] = eps
    return out


def _gpt2(base: nn.Module) -> dict[str, Any] | None:
    blocks = base.transformer.h
    n_head = _uniform([b.attn.num_heads for b in blocks])
    inner = _uniform([in_out_features(b.mlp.c_fc)[1] for b in blocks])
    if None in (n_head, inner):
        return None
    return {"n_embd": int(base.transformer.wte.weight.shape[1]), "n_head": n_head, "n_inner": inner}


def _opt(base: nn.Module) -> dict[str, Any] | None:
    layers = base.model.decoder.layers
    heads = _uniform([layer.self_attn.num_heads for layer in layers])
    ffn = _uniform([in_out_features(layer.fc1)[1] for layer in layers])
    if None in (heads, ffn):
        return None
    hidden = int(in_out_features(layers[0].self_attn.out_proj)[1])
    return {"hidden_size": hidden, "num_attention_heads": heads, "ffn_dim": ffn}


def _bert(base: nn.Module) -> dict[str, Any] | None:
    enc = base.bert.encoder if hasattr(base, "bert") else base.encoder
    heads = _uniform([layer.attention.self.num_attention_heads for layer in enc.layer])
    inter = _uniform([in_out_features(layer.intermediate.dense)[1] for layer in enc.layer])
    if None in (heads, inter):
        return None
    emb = base.bert.embeddings if hasattr(base, "bert") else base.embeddings
    return {"hidden_size": int(emb.word_embeddings.weight.shape[1]), "num_attention_heads": heads,
            "intermediate_size": inter}


CONFIG_RULES: dict[str, Callable[[nn.Module], dict[str, Any] | None]] = {
    "llama": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "mistral": _llama_like,
    "mixtral": partial(_llama_like, mlp=moe_sizes),
    "qwen3_moe": partial(_llama_like, mlp=moe_sizes),
    "gpt_oss": partial(_llama_like, mlp=moe_sizes),
    "gpt2": _gpt2,
    "opt": _opt,
    "bert": _bert,
}
"""config.model_type -> function reading uniform sizes off the model (None when layers differ)."""


def candidate_config_updates(model: nn.Module) -> dict[str, Any] | None:
    """Config fields that describe ``model``'s current sizes, or None (unknown type or non-uniform)."""
    base = hf_base_model(model)
    if base is None:
        return None
    rule = CONFIG_RULES.get(getattr(base.config, "model_type", ""))
    if rule is None:
        return None
    try:
        return rule(base)
    except AttributeError:
        return None


def _base_state_shapes(base: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the base model's tensors, with peft's LoRA tensors dropped and base_layer names folded."""
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in base.state_dict().items():
        if not is_lora_param(k):
            shapes[base_weight_name(k)] = tuple(v.shape)
    return shapes


def skeleton_shapes(cls: type, config: Any) -> dict[str, tuple[int, ...]] | None:
    """Shapes of a ``cls`` built from ``config`` on the meta device, or None when the config is rejected."""
    try:
        with torch.device("meta"):
            skel = cls._from_config(config)  # type: ignore[attr-defined]
    except Exception:  # transformers validates configs with several exception types; any means "rejected"
        return None
    return {k: tuple(v.shape) for k, v in skel.state_dict().items()}


def refresh_config(model: nn.Module) -> bool:
    """Write uniform sizes into the transformers config when they rebuild ``model`` exactly.

    Returns True when a plain ``from_pretrained`` of the base model can rebuild these shapes.
    """
    base = hf_base_model(model)
    if base is None:
        return False
    updates = candidate_config_updates(model)
    if updates is None:
        return False
    try:
        candidate = base.config.__class__.from_dict({**base.config.to_dict(), **updates})
    except Exception:  # strict config validation rejected the sizes
        return False
    shapes = skeleton_shapes(type(base), candidate)
    if shapes is None or shapes != _base_state_shapes(base):
        return False
    for k, v in updates.items():
        setattr(base.config, k, v)
    return True


UNLOADABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "llama": ("intermediate_size", "num_key_value_heads", "hidden_size"),
    "mistral": ("intermediate_size", "num_key_value_heads", "hidden_size"),
    "qwen2": ("intermediate_size", "num_key_value_heads", "hidden_size"),
    "qwen3": ("intermediate_size", "num_key_value_heads", "hidden_size"),
    "gpt2": ("n_inner", "n_embd"),
    "opt": ("ffn_dim", "hidden_size"),
    "bert": ("intermediate_size", "hidden_size"),
}
"""config.model_type -> the size fields tried first by :func:`unloadable_config` (then the generic ones)."""

_GENERIC_FIELDS = ("intermediate_size", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings")


def _refused_with(config_class: Any, doc: dict[str, Any], needle: str) -> bool:
    """True when ``config_class`` refuses ``doc`` with an error whose message holds ``needle``."""
    try:
        config_class.from_dict(doc)
    except Exception as e:  # transformers validates configs with several exception types
        return needle in str(e)
    return False


def unloadable_config(doc: dict[str, Any], config_class: Any, message: str, needle: str = "shear.load") -> dict[str, Any]:
    """``doc`` (a transformers config as a dict) changed so that stock transformers refuses to build a model
    from it, with an error that quotes ``message``, before any weight is read:

    * ``model_type`` becomes ``"shear: <message>"``: ``AutoConfig``/``AutoModelForCausalLM`` raise their
      "model type ... not recognize" ``ValueError`` quoting it (``AutoTokenizer``, which catches that
      ``ValueError``, still loads the folder's tokenizer);
    * one integer size field becomes ``message``: the model's own class (``LlamaForCausalLM.from_pretrained``)
      refuses it in transformers 5's type checks (``Field 'intermediate_size' expected int, got str
      (value: '...')``). The field is the first of :data:`UNLOADABLE_FIELDS` for the model type, then of a
      few generic ones, whose refusal by ``config_class`` is *tested* to quote ``needle``; none is
      changed when ``config_class`` checks no types.

    Example:
        >>> from transformers import LlamaConfig
        >>> bad = unloadable_config(LlamaConfig().to_dict(), LlamaConfig, "load it with shear.load(path)")
        >>> bad["model_type"], bad["intermediate_size"]
        ('shear: load it with shear.load(path)', 'load it with shear.load(path)')
    """
    fields = UNLOADABLE_FIELDS.get(str(doc.get("model_type", "")), ()) + _GENERIC_FIELDS
    out = {**doc, "model_type": f"shear: {message}"}
    for field in dict.fromkeys(fields):
        if field in doc and _refused_with(config_class, {**out, field: message}, needle):
            return {**out, field: message}
    return out
