"""Tiny configs of every causal-LM architecture the installed transformers knows (random weights, offline).

Each architecture's default config is shrunk by one table of size fields (hidden 64, MLP 96, 4
query / 2 kv heads of 16, 2 layers, 4 experts, vocabulary 128), and per-layer lists (``layer_types``
and the like) keep one layer of each distinct kind, so a hybrid model still has each of its layer
kinds. Nothing is downloaded: the weights are random. The architecture sweep
(``python -m tools.arch_sweep``) builds every one of these and prunes it.

Example:
    >>> from shear.zoo.tiny_configs import causal_lm_types, tiny_causal_lm
    >>> "llama" in causal_lm_types()
    True
    >>> model = tiny_causal_lm("llama")
    >>> model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size
    (64, 2, 128)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shear.errors import ModelLoadError

__all__ = ["OVERRIDES", "SIZES", "TINY_VOCAB", "UNSET", "causal_lm_types", "shrink_config", "tiny_causal_lm", "tiny_config"]

TINY_VOCAB = 128

SIZES: dict[str, int] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "emb_dim": 64, "embed_dim": 64, "hidden_dim": 64,
    "intermediate_size": 96, "ffn_dim": 96, "d_ff": 96, "n_inner": 96, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "expert_intermediate_size": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "attention_heads": 4, "head_dim": 16,
    "n_routed_experts": 4, "num_experts": 4, "num_local_experts": 4,
    "max_position_embeddings": 128, "n_positions": 128,
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "dim_model": 64, "dim_ff": 96, "dim_head": 16, "d_inner": 96,
    "o_lora_rank": 16, "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8, "num_experts_per_token": 2, "num_expert_group": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "rotary_dim": 8,
}  # fmt: skip
"""Size field -> its tiny value (a default already smaller is kept; ``vocab_size`` is always set)."""

UNSET: dict[str, Any] = {"head_dim": 16, "num_key_value_heads": 2, "num_experts_per_tok": 2}
"""Fields a default config leaves ``None`` (a checkpoint sets them) that the model needs."""

OVERRIDES: dict[str, dict[str, Any]] = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"num_heads": 8},
    "reformer": {"is_decoder": True, "axial_pos_embds": False},
}
"""Architecture -> fields its default config cannot run without, set after shrinking."""

_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
              "mask_token_id", "unk_token_id", "cls_token_id")  # fmt: skip
_DEPTH = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token(v: int) -> int:
    return v if v < 64 else 2


def _layer_picks(d: dict[str, Any], depth: int) -> tuple[list[str], list[int]]:
    """The per-layer lists of ``d`` and the layers that keep one of each distinct row (at least 2)."""
    lists = [k for k, v in d.items() if isinstance(v, list) and len(v) == depth]
    rows = [tuple(str(d[k][i]) for k in lists) for i in range(depth)]
    picks = sorted({rows.index(r) for r in rows})
    for i in range(depth):
        if len(picks) >= 2:
            break
        if i not in picks:
            picks = sorted([*picks, i])
    return lists, picks


def shrink_config(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a config's ``to_dict()``) with every size field made tiny; nested configs too.

    >>> shrink_config({"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
    ...                "num_hidden_layers": 4, "layer_types": ["a", "a", "b", "a"]})["layer_types"]
    ['a', 'b']
    """
    out = dict(d)
    heads = d.get("num_attention_heads")
    for k, v in d.items():
        if isinstance(v, dict) and "model_type" in v:
            out[k] = shrink_config(v)
        elif k in SIZES and _is_int(v):
            out[k] = SIZES[k] if k == "vocab_size" else min(v, SIZES[k])
        elif k == "num_key_value_heads" and _is_int(v):
            out[k] = 4 if v == heads else (1 if v == 1 else 2)  # MHA stays MHA, MQA stays MQA
        elif k in _TOKEN_IDS and _is_int(v):
            out[k] = _token(v)
        elif k in _TOKEN_IDS and isinstance(v, list):
            out[k] = [_token(x) if _is_int(x) else x for x in v]
        elif k in UNSET and v is None:
            out[k] = UNSET[k]
        elif k == "num_experts_per_tok" and _is_int(v):
            out[k] = min(v, 2)
    if _is_int(d.get("head_dim")) and d.get("head_dim") == d.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # DeepSeek's head_dim is its rope part
    depth = next((d[k] for k in _DEPTH if _is_int(d.get(k))), 0)
    if depth > 2:
        lists, picks = _layer_picks(d, depth)
        if lists:
            for k in lists:
                out[k] = [d[k][i] for i in picks]
            for k in _DEPTH:
                if _is_int(d.get(k)):
                    out[k] = len(picks)
        for k, v in d.items():  # per-layer tables keyed by layer index ("05": {...}) follow the kept layers
            if isinstance(v, dict) and v and all(str(i).isdigit() for i in v):
                new = {str(j): shrink_config(v[str(i)]) for j, i in enumerate(picks) if str(i) in v}
                new.update({f"{j:02d}": shrink_config(v[f"{i:02d}"]) for j, i in enumerate(picks) if f"{i:02d}" in v})
                out[k] = new
    return out


def causal_lm_types() -> dict[str, str]:
    """``model_type`` -> causal-LM class name, as the installed transformers maps them."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _model_class(model_type: str) -> type[nn.Module]:
    import transformers

    names = causal_lm_types()
    if model_type not in names:
        raise ModelLoadError(
            f"{model_type!r} is not a causal-LM architecture of transformers {transformers.__version__}; "
            f"pick one of causal_lm_types() ({len(names)} of them)"
        )
    cls = getattr(transformers, names[model_type], None)
    if cls is None:
        raise ModelLoadError(f"transformers {transformers.__version__} names {names[model_type]} but does not export it")
    return cls  # type: ignore[no-any-return]


def tiny_config(model_type: str) -> Any:
    """The causal-LM class's own config for ``model_type``, shrunk (only the changed fields are passed,
    so fields a config derives from others are derived again)."""
    cls = _model_class(model_type).config_class  # type: ignore[attr-defined]
    default = cls().to_dict()
    small = {**shrink_config(default), **OVERRIDES.get(model_type, {})}
    return cls(**{k: v for k, v in small.items() if v != default.get(k)})


def tiny_causal_lm(model_type: str, *, seed: int = 0) -> nn.Module:
    """A randomly initialised tiny causal LM of ``model_type``, in float32 and eval mode."""
    cls = _model_class(model_type)
    torch.manual_seed(seed)
    return cls(tiny_config(model_type)).float().eval()  # type: ignore[call-arg]
