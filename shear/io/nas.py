"""The NVIDIA Nemotron-NAS (DeciLM) checkpoint: per-layer widths that vLLM, TensorRT-LLM, MLX and llama.cpp read.

Nemotron-NAS is the format Llama-3.1-Nemotron-51B and Llama-3.3-Nemotron-Super-49B ship in: LLaMA
tensor names in ``model.safetensors`` and a ``config.json`` with ``architectures:
["DeciLMForCausalLM"]``, ``model_type: "nemotron-nas"`` and one ``block_configs`` entry per layer::

    {"attention": {"n_heads_in_group": 3, "no_op": false, "replace_with_linear": false, "sparsify": null},
     "ffn": {"ffn_mult": 2.6666666666666665, "no_op": false, "replace_with_linear": false, "sparsify": null}}

What its readers take from it (read from their source: vLLM's ``models/nemotron_nas.py`` and
``ModelArchConfigConvertor``, TensorRT-LLM's ``models/nemotron_nas/{config,convert}.py``, llama.cpp's
``conversion/deci.py`` and ``src/models/deci.cpp``, MLX's ``models/nemotron-nas.py``):

* a layer's kv heads = ``num_attention_heads // n_heads_in_group``; its query heads are always
  ``num_attention_heads``, one count for every layer;
* a layer's MLP width = ``int(2 * ffn_mult * hidden_size / 3)`` rounded up to a multiple of 256
  (:func:`ffn_width`), so widths that are not multiples of 256 cannot be said;
* the head size = ``hidden_size // num_attention_heads`` for llama.cpp's converter and MLX (vLLM
  reads ``head_dim``), so the residual and the query heads keep ``heads * head_dim == hidden``;
* ``no_op`` drops a block, its norm included (llama.cpp reads ``n_heads_in_group``/``ffn_mult`` =
  null for it, and its graph skips a whole layer whose MLP is null); ``replace_with_linear`` swaps
  it for one Linear, which a LLaMA layer cannot hold.

So the format holds LLaMA-family models (LLaMA, Mistral without sliding windows, SmolLM2; Qwen2
only without its q/k/v biases) whose MLP widths differ per layer in multiples of 256:
:data:`NAS_KINDS` are the group kinds it lets a pruner narrow per layer. :func:`nas_refusal` says
whether an (unpruned) model's architecture fits; :func:`plan_nas` checks a pruned model and
raises :class:`~shear.errors.ExportError` naming what the format cannot hold and the fix. An
attention or MLP block erased whole (:class:`~shear.model.blocks.RemovedBranch`) is a ``no_op`` block.
shear writes every field the readers above use (:func:`nas_config`); LoRA adapters must be
merged first (``merge-lora``), a tied ``lm_head`` is written out (TensorRT-LLM reads it), and
``model.safetensors.index.json`` lists the weights so that readers skip shear's own files.

Example:
    >>> ffn_width(ffn_mult_for(1280, 576), 576)
    1280
    >>> ffn_mult_for(1000, 576) is None     # not a multiple of 256
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shear.codegen.hf_config import hf_base_model, layer_widths
from shear.errors import CheckpointError, ExportError
from shear.io.nas_config_code import AUTO_MAP
from shear.io.safe_archive import read_json_file
from shear.model.facts import base_weight_name, is_lora_param

__all__ = [
    "FFN_MULTIPLE",
    "INDEX_FILE",
    "NAS_ARCHITECTURE",
    "NAS_FAMILY",
    "NAS_KINDS",
    "NAS_MODEL_TYPE",
    "NasLayer",
    "NasPlan",
    "block_widths",
    "check_nas_folder",
    "ffn_mult_for",
    "ffn_width",
    "nas_config",
    "nas_refusal",
    "nas_weights",
    "plan_nas",
    "write_index",
]

NAS_ARCHITECTURE = "DeciLMForCausalLM"
NAS_MODEL_TYPE = "nemotron-nas"
FFN_MULTIPLE = 256
"""Readers round a layer's MLP width up to a multiple of this."""
INDEX_FILE = "model.safetensors.index.json"
"""Lists the weight tensors, so that vLLM, TensorRT-LLM and llama.cpp read ``model.safetensors`` only."""
NAS_KINDS: tuple[str, ...] = ("channel",)
"""Group kinds the format holds pruned per layer: MLP channels (in multiples of :data:`FFN_MULTIPLE`).
Heads and the residual stay whole (one query-head count for all layers, head size = hidden / heads)."""
NAS_FAMILY: dict[str, str] = {"llama": "LLaMA", "mistral": "Mistral", "qwen2": "Qwen2"}
"""transformers ``model_type`` -> family name, for the models whose layers are LLaMA layers."""
_ROPE_TYPES = ("default", "llama3")
"""Rope kinds every reader applies (llama.cpp's converter writes llama3's factors; others it drops)."""
_LAYER_PARAMS = frozenset({
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
})
"""The tensors of a Nemotron-NAS layer (no biases: the readers build bias-free LLaMA layers)."""
_FIX = ("prune with --target nas (shear.compile(..., target='nas')), which narrows only MLP channels, per "
        "layer, in multiples of 256; or save with target='shear' (shear.load) or export GGUF (shear export)")


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width the readers build from ``ffn_mult``: ``int(2 * ffn_mult * hidden_size / 3)`` rounded up
    to a multiple of 256 (vLLM's and llama.cpp's ``_ffn_mult_to_intermediate_size``, verbatim)."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_MULTIPLE == 0 else n + FFN_MULTIPLE - n % FFN_MULTIPLE


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """The shortest ``ffn_mult`` that :func:`ffn_width` maps back to ``width``, also after MLX rounds it to 6
    decimals; None when ``width`` is not a positive multiple of 256."""
    if width <= 0 or width % FFN_MULTIPLE:
        return None
    exact = 3 * width / (2 * hidden_size)
    for digits in (2, 4, 6, 8, 10, 12):
        m = round(exact, digits)
        if ffn_width(m, hidden_size) == width and ffn_width(round(m, 6), hidden_size) == width:
            return float(m)
    return float(exact) if ffn_width(exact, hidden_size) == width else None


def _rope(config: Any) -> tuple[dict[str, Any], str | None]:
    """(rope parameters, reason the readers cannot apply them or None)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    if not params:
        params = {"rope_theta": float(getattr(config, "rope_theta", 10000.0)), **scaling}
    kind = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_type", kind)
    if float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)) != 1.0:
        return params, "partial rotary embeddings: the readers rotate whole heads"
    if kind not in _ROPE_TYPES:
        return params, (f"rope scaling {kind!r}: llama.cpp's converter carries only default and llama3 rope "
                        "into the file")
    return params, None


def _biases(base: nn.Module) -> list[str]:
    layers: Any = base.model.layers  # type: ignore[union-attr]
    return [n for n, _ in layers[0].named_parameters() if n.endswith(".bias") and not is_lora_param(n)]


def nas_refusal(model: nn.Module) -> str | None:
    """Why the Nemotron-NAS format cannot hold ``model``'s architecture, or None when it can.

    Looks at the architecture only (family, activation, biases, rope, sliding window, head size),
    not at pruned widths or adapters (:func:`plan_nas` checks those), so it can be asked of the
    unpruned model before a run, e.g. to pick the target a pruner aims at.

    Example:
        >>> nas_refusal(torch.nn.Linear(2, 2))
        'Linear is not a transformers model; the Nemotron-NAS format holds LLaMA-family causal LMs'
    """
    return _architecture_problem(model, heads=True)


def _architecture_problem(model: nn.Module, *, heads: bool) -> str | None:
    """:func:`nas_refusal`; ``heads=False`` leaves out the config's head-size check (:func:`plan_nas` checks
    the pruned widths themselves and names the fix)."""
    base: Any = hf_base_model(model)
    if base is None:
        return f"{type(model).__name__} is not a transformers model; the Nemotron-NAS format holds LLaMA-family causal LMs"
    config = base.config
    model_type = getattr(config, "model_type", "")
    if model_type not in NAS_FAMILY:
        return (f"{type(base).__name__} (model_type {model_type!r}) is not a LLaMA-family model; the Nemotron-NAS format "
                f"holds LLaMA layers ({', '.join(NAS_FAMILY.values())})")
    if getattr(getattr(base, "model", None), "layers", None) is None or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} has no model.layers / lm_head to write as LLaMA tensors"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r}: the format's MLP is SiLU-gated"
    biases = _biases(base)
    if biases:
        return (f"its layers have biases ({', '.join(biases[:3])}); the format's readers build LLaMA layers without "
                "them (Qwen2's q/k/v biases)")
    names = {base_weight_name(n) for n, _ in base.model.layers[0].named_parameters() if not is_lora_param(n)}
    unknown = sorted(names - _LAYER_PARAMS)
    if unknown:
        return f"its layers hold {unknown[:3]}, which a Nemotron-NAS layer has no place for"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return (f"sliding-window attention (sliding_window={config.sliding_window}): the format's readers attend "
                "over the whole context")
    _, rope_problem = _rope(config)
    if rope_problem:
        return rope_problem
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if heads and hd * config.num_attention_heads != config.hidden_size:
        return (f"head_dim {hd} x {config.num_attention_heads} heads != hidden_size {config.hidden_size}: llama.cpp's "
                "converter and MLX take the head size as hidden_size / num_attention_heads")
    return None


@dataclass(frozen=True)
class NasLayer:
    """One layer as the format says it: kv heads (query heads are global) and MLP width through ``ffn_mult``;
    0 kv heads or 0 MLP width is an erased block (``no_op``)."""

    n_head_kv: int
    n_ff: int
    ffn_mult: float | None


@dataclass(frozen=True)
class NasPlan:
    """What ``config.json`` says about a model the format holds (checked by :func:`plan_nas`)."""

    hidden: int
    n_head: int
    head_dim: int
    layers: tuple[NasLayer, ...]
    rms_eps: float
    tied: bool

    def block_configs(self) -> list[dict[str, Any]]:
        """``block_configs``: every field vLLM, TensorRT-LLM, llama.cpp and MLX read, for every layer. An erased
        block is ``no_op`` with a null ``n_heads_in_group`` / ``ffn_mult`` (what llama.cpp's converter reads)."""
        return [
            {
                "attention": {"n_heads_in_group": self.n_head // layer.n_head_kv if layer.n_head_kv else None,
                              "no_op": not layer.n_head_kv, "replace_with_linear": False, "sparsify": None},
                "ffn": {"ffn_mult": layer.ffn_mult, "no_op": not layer.n_ff, "replace_with_linear": False,
                        "sparsify": None},
            }
            for layer in self.layers
        ]

    @property
    def llama_cpp_problem(self) -> str | None:
        """Why llama.cpp would run this model wrong, or None: its ``deci`` graph skips a whole layer whose MLP is
        ``no_op``, the layer's attention included (``src/models/deci.cpp``, meant for Nemotron-253B's empty layers)."""
        bad = [i for i, layer in enumerate(self.layers) if layer.n_head_kv and not layer.n_ff]
        if not bad:
            return None
        return (f"layer {bad[0]} keeps its attention but lost its MLP, and llama.cpp's deci graph skips such a layer "
                "whole (attention included)")


def _adapters(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_lora_param(n)]


def _epsilons(base: nn.Module) -> set[float]:
    eps: list[Any] = [getattr(m, "variance_epsilon", None) for m in base.modules()]
    return {float(e) for e in eps if e is not None}


def _spread(values: list[int]) -> str:
    """``[1280, 1280, 1024]`` -> ``'1280 (layers 0, 1), 1024 (layer 2)'``."""
    by: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        by.setdefault(v, []).append(i)
    parts = []
    for v, idx in by.items():
        shown = ", ".join(map(str, idx[:4])) + (f", ... ({len(idx)} layers)" if len(idx) > 4 else "")
        parts.append(f"{v} (layer{'s' if len(idx) > 1 else ''} {shown})")
    return "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")


def plan_nas(model: nn.Module) -> NasPlan:
    """Check that the Nemotron-NAS format holds the pruned ``model`` exactly and read what its config says.

    Raises :class:`ExportError` naming what the format cannot hold and the fix: an architecture
    :func:`nas_refusal` refuses, unmerged LoRA adapters, query-head counts or head sizes that
    differ between layers or do not fill the residual (``heads * head_dim != hidden``), kv heads
    that do not divide the query heads, MLP widths that are not multiples of 256, norms with
    different epsilons. An erased attention or MLP block (``shear.model.blocks.RemovedBranch``,
    its norm gone too) is written ``no_op``.
    """
    problem = _architecture_problem(model, heads=False)
    if problem:
        raise ExportError(f"the Nemotron-NAS format cannot hold this model: {problem}; save it with target='shear' "
                          "(shear.load) or target='hf' where its widths are uniform")
    lora = _adapters(model)
    if lora:
        raise ExportError(
            f"the model carries {len(lora)} unmerged LoRA tensors (e.g. {lora[0]}); a Nemotron-NAS folder holds plain "
            "weights, so readers would run without them. Merge them first: end the pipeline with merge-lora, or call "
            "merge_and_unload() on the PeftModel"
        )
    base: Any = hf_base_model(model)
    widths = layer_widths(base)
    if not widths:
        raise ExportError(f"{type(base).__name__} has no decoder layers to write")
    attn = [w for w in widths if w.n_head]  # erased attention blocks (no_op) have no heads
    heads = [w.n_head for w in widths]
    if len({w.n_head for w in attn}) > 1:
        raise ExportError(
            f"query heads differ between layers ({_spread(heads)}); the format has one num_attention_heads for every "
            f"layer (a layer varies only its kv groups, and shear removes a kv head with its query heads): {_FIX}"
        )
    head_dims = {w.head_dim for w in attn}
    if len(head_dims) > 1:
        raise ExportError(f"head_dim differs between layers ({sorted(head_dims)}); the format has one head size: {_FIX}")
    config = base.config
    n_head = attn[0].n_head if attn else int(config.num_attention_heads)
    hd = head_dims.pop() if attn else int(getattr(config, "head_dim", 0) or config.hidden_size // n_head)
    hidden = int(base.model.embed_tokens.weight.shape[1])
    if n_head * hd != hidden:
        raise ExportError(
            f"{n_head} query heads of {hd} do not fill the {hidden}-wide residual stream; llama.cpp's converter and MLX "
            f"take the head size as hidden_size / num_attention_heads, so heads and the residual cannot be pruned for "
            f"this format: {_FIX}"
        )
    bad_kv = [i for i, w in enumerate(widths) if w.n_head and n_head % w.n_head_kv]
    if bad_kv:
        raise ExportError(
            f"layer {bad_kv[0]} keeps {widths[bad_kv[0]].n_head_kv} kv heads for {n_head} query heads; the format says kv "
            f"heads as n_heads_in_group = num_attention_heads // kv heads, which must divide evenly: {_FIX}"
        )
    mults = [ffn_mult_for(w.n_ff, hidden) if w.n_ff else None for w in widths]
    if any(m is None and w.n_ff for w, m in zip(widths, mults)):
        ffs = [w.n_ff for w in widths]
        raise ExportError(
            f"MLP widths {_spread(ffs)} are not all multiples of {FFN_MULTIPLE}; the format says a layer's MLP width "
            f"as ffn_mult, which its readers turn into int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of "
            f"{FFN_MULTIPLE}: {_FIX}"
        )
    eps = _epsilons(base)
    if len(eps) != 1:
        raise ExportError(f"RMSNorm epsilons differ ({sorted(eps)[:4]}); the format has one rms_norm_eps: {_FIX}")
    embed, head = base.model.embed_tokens.weight, base.lm_head.weight
    tied = bool(getattr(base.config, "tie_word_embeddings", False)) or head.data_ptr() == embed.data_ptr()
    if tied and not torch.equal(head, embed):
        raise ExportError("the config ties lm_head to the embedding but their weights differ; untie or re-tie them")
    layers = tuple(NasLayer(w.n_head_kv, w.n_ff, m) for w, m in zip(widths, mults))
    return NasPlan(hidden, n_head, hd, layers, eps.pop(), tied)


def nas_config(model: nn.Module, plan: NasPlan) -> dict[str, Any]:
    """``config.json`` of the Nemotron-NAS folder: the model's own config (bos/eos, vocabulary, context) with
    the format's fields; ``intermediate_size`` (per layer in ``block_configs``) holds a note naming the
    loaders, so that stock transformers' LLaMA class refuses the folder instead of building wrong sizes."""
    base: Any = hf_base_model(model)
    doc = json.loads(base.config.to_json_string(use_diff=False))
    rope, _ = _rope(base.config)
    for key in ("architectures", "auto_map", "_name_or_path", "layer_types", "sliding_window", "use_sliding_window",
                "max_window_layers", "rope_scaling"):
        doc.pop(key, None)
    doc.update({
        "architectures": [NAS_ARCHITECTURE],
        "model_type": NAS_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "block_configs": plan.block_configs(),
        "num_hidden_layers": len(plan.layers),
        "hidden_size": plan.hidden,
        "num_attention_heads": plan.n_head,
        "head_dim": plan.head_dim,
        "num_key_value_heads": next((layer.n_head_kv for layer in plan.layers if layer.n_head_kv), plan.n_head),
        "intermediate_size": ("per layer in block_configs (ffn_mult): a Nemotron-NAS folder; load it with vLLM "
                              "(--trust-remote-code), TensorRT-LLM, MLX, llama.cpp's convert_hf_to_gguf.py or "
                              "shear.load(path)"),
        "hidden_act": "silu",
        "rms_norm_eps": plan.rms_eps,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": plan.tied,
        "vocab_size": int(base.model.embed_tokens.weight.shape[0]),
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_parameters": rope,
        "rope_scaling": None if rope.get("rope_type") == "default" else rope,
    })
    doc.setdefault("max_position_embeddings", int(getattr(base.config, "max_position_embeddings", 2048)))
    return doc


def nas_weights(tensors: Mapping[str, torch.Tensor], plan: NasPlan) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``: the model's own (LLaMA names) plus ``lm_head.weight`` when it is
    tied (TensorRT-LLM reads it whatever the config says; vLLM skips it then)."""
    out = dict(tensors)
    if plan.tied and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()
    return out


def write_index(folder: Path, weights: Mapping[str, torch.Tensor], file: str = "model.safetensors") -> None:
    """``model.safetensors.index.json`` naming ``file`` for every weight (readers glob ``*.safetensors`` otherwise)."""
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: file for k in sorted(weights)}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def block_widths(doc: Mapping[str, Any], where: str = "config.json") -> list[tuple[int, int, int]]:
    """``(query heads, kv heads, MLP width)`` per layer as a Nemotron-NAS config says them, the way its readers
    compute them: ``no_op`` (or a null ``n_heads_in_group`` / ``ffn_mult``) is a block of width 0.
    A linear replacement block (``replace_with_linear``) has no LLaMA equivalent: :class:`CheckpointError`."""
    try:
        n_head, hidden = int(doc["num_attention_heads"]), int(doc["hidden_size"])
        out = []
        for i, block in enumerate(doc["block_configs"]):
            attn, ffn = block["attention"], block["ffn"]
            if attn.get("replace_with_linear") or ffn.get("replace_with_linear"):
                raise CheckpointError(
                    f"{where}: block_configs[{i}] replaces a block with a linear layer, which a LLaMA layer cannot "
                    "hold; shear reads the Nemotron-NAS folders it writes"
                )
            group = None if attn.get("no_op") else attn.get("n_heads_in_group")
            mult = None if ffn.get("no_op") else ffn.get("ffn_mult")
            heads = (n_head, n_head // int(group)) if group else (0, 0)
            out.append((*heads, ffn_width(float(mult), hidden) if mult is not None else 0))
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise CheckpointError(f"{where} is not a readable Nemotron-NAS config ({type(e).__name__}: {e}); re-save the "
                              "model") from e
    return out


def check_nas_folder(path: str | os.PathLike[str], model: nn.Module) -> None:
    """``path/config.json`` says exactly the loaded ``model``'s widths: its architecture and model type, the
    residual width, and per layer (through :func:`block_widths`) the query heads, kv heads and MLP width.
    :class:`CheckpointError` otherwise (an edited config would make every other reader build another model)."""
    where = f"{path}/config.json"
    doc = read_json_file(Path(path) / "config.json", where, 64 << 20, fix="Re-save the model")
    if not isinstance(doc, dict) or doc.get("model_type") != NAS_MODEL_TYPE or doc.get("architectures") != [NAS_ARCHITECTURE]:
        raise CheckpointError(f"{where} is not a Nemotron-NAS config (model_type {NAS_MODEL_TYPE!r}, architectures "
                              f"[{NAS_ARCHITECTURE!r}]); restore it, or re-save the model")
    widths = layer_widths(model) or []
    said = block_widths(doc, where)
    have = [(w.n_head, w.n_head_kv, w.n_ff) for w in widths]
    base: Any = hf_base_model(model)
    hidden = int(base.model.embed_tokens.weight.shape[1])
    if len(said) != len(have) or doc.get("hidden_size") != hidden:
        raise CheckpointError(f"{where} says {len(said)} layers of hidden size {doc.get('hidden_size')}, the weights "
                              f"have {len(have)} of {hidden}; restore the config, or re-save the model")
    for i, (s, h) in enumerate(zip(said, have)):
        if s != h:
            raise CheckpointError(
                f"{where}: block_configs[{i}] makes (query heads, kv heads, MLP width) = {s}, the weights have {h}; "
                "the config was edited or belongs to another model. Restore it, or re-save the model"
            )
