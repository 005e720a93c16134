"""Write a pruned LLaMA-family model as a GGUF file that llama.cpp (llama-server, ollama, LM Studio) runs.

GGUF stores one set of sizes per model unless an architecture reads them per layer. llama.cpp's
``llama`` and ``qwen2`` graphs size every layer from layer 0; its ``deci`` graph (the LLaMA
variant of Nemotron-51B, which has per-layer widths) reads ``head_count``, ``head_count_kv`` and
``feed_forward_length`` as per-layer arrays. So:

* every layer kept the same widths → the model's own architecture (``llama`` for LLaMA, Mistral
  and SmolLM2; ``qwen2`` for Qwen2), scalar sizes, as llama.cpp's own converter writes it;
* widths differ between layers → ``deci``, with the three arrays. Its layer is the LLaMA layer
  (RMSNorm, rotary attention with optional q/k/v biases, SwiGLU MLP), so Qwen2 goes there too.

What GGUF cannot hold is refused before a byte is written (:class:`~shear.errors.ExportError`):
a head_dim that differs between layers (one ``attention.key_length``), a layer left with no
heads or no MLP channels, norms with different epsilons, rope scaling other than linear,
architectures outside the family, and LoRA adapters that are not merged (``merge_lora=True``
folds them in; the model is not changed).

Conventions (read from gguf's ``constants.py``/``gguf_writer.py`` and llama.cpp's loader):

* tensors are written row-major as torch holds them, so a ``[out, in]`` weight has GGUF shape
  ``(in, out)``; 2-D weights in the requested dtype, 1-D tensors (norms, biases) in f32;
* llama.cpp's ``llama``/``deci`` rope rotates adjacent pairs of a head, transformers rotates
  the first half of a head against the second, so q and k rows (and biases) are reordered per
  head from ``[2, head_dim/2]`` to ``[head_dim/2, 2]``. ``qwen2`` uses the half-split rope and
  is written as is;
* a tied ``lm_head`` is not written: llama.cpp reuses ``token_embd`` when ``output`` is missing.

Example:
    >>> import shear                                                          # doctest: +SKIP
    >>> shear.export(small, "small.gguf", format="gguf", dtype="f16", tokenizer=tok)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shear.codegen.hf_config import hf_base_model
from shear.errors import ExportError
from shear.io.gguf_vocab import GgufVocab, check_pre, read_vocab
from shear.io.outputs import atomic_file, check_output_file
from shear.model.facts import base_weight_name, is_lora_param

__all__ = [
    "check_pre",
    "DTYPES",
    "FAMILY",
    "GgufPlan",
    "LayerWidths",
    "export_gguf",
    "gguf_tensors",
    "plan_gguf",
    "rope_interleave",
]

DTYPES: dict[str, torch.dtype] = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
"""Weight types a GGUF export writes (2-D weights; 1-D tensors are always f32)."""

FAMILY: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers ``model_type`` -> llama.cpp architecture for uniform widths (non-uniform: ``deci``)."""

_NORM_ROPE = {"llama", "deci"}
"""llama.cpp architectures whose rope rotates adjacent pairs (q/k rows are reordered for them)."""

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
"""transformers tensor name inside ``model.layers.<i>`` -> GGUF name inside ``blk.<i>``."""

_REQUIRED = [k for k in _LAYER_TENSORS if k.endswith(".weight")]


@dataclass(frozen=True)
class LayerWidths:
    """The kept widths of one decoder layer."""

    n_head: int
    n_head_kv: int
    n_ff: int

    def __post_init__(self) -> None:
        if min(self.n_head, self.n_head_kv, self.n_ff) <= 0 or self.n_head % self.n_head_kv:
            raise ExportError(f"layer widths {self} are not a GQA attention and an MLP")


@dataclass(frozen=True)
class GgufPlan:
    """Everything the GGUF header says about the model, checked to be representable."""

    arch: str
    """llama.cpp architecture written to ``general.architecture``."""
    model_type: str
    """transformers ``config.model_type`` of the source."""
    n_embd: int
    n_vocab: int
    head_dim: int
    layers: tuple[LayerWidths, ...]
    rms_eps: float
    rope_theta: float
    rope_linear_factor: float | None
    """Linear rope scaling factor, or None."""
    context_length: int
    tied: bool
    """True when ``lm_head`` shares the embedding (no ``output.weight`` is written)."""

    @property
    def uniform(self) -> bool:
        return all(w == self.layers[0] for w in self.layers)

    def per_layer(self, field: str) -> int | list[int]:
        """A scalar when every layer has the same value of ``field``, else one value per layer."""
        values = [getattr(w, field) for w in self.layers]
        return values[0] if all(v == values[0] for v in values) else values


def _rope_config(config: Any) -> tuple[float, float | None]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ExportError("partial rotary embeddings cannot be written to a LLaMA-family GGUF")
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), float(params.get("factor", scaling.get("factor", 1.0)))
    raise ExportError(
        f"rope scaling {kind!r} is not supported by the GGUF export yet (default and linear are); "
        "export the model without it or add it to shear.io.gguf"
    )


def _layer_tensors(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``<path in layer>.<weight|bias>`` -> (module holding it through peft wrappers, attribute)."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for full, _ in layer.named_parameters():
        if is_lora_param(full):
            continue
        key = base_weight_name(full)
        owner_path, attr = full.rsplit(".", 1)
        out[key] = (layer.get_submodule(owner_path), attr)
    return out


def plan_gguf(model: nn.Module) -> GgufPlan:
    """Check that ``model`` fits a LLaMA-family GGUF and read its sizes; raises :class:`ExportError`."""
    base: Any = hf_base_model(model)
    if base is None:
        raise ExportError(
            f"{type(model).__name__} is not a transformers model; GGUF export reads a *ForCausalLM"
        )
    config: Any = base.config
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILY:
        raise ExportError(
            f"GGUF export supports the LLaMA family ({', '.join(sorted(FAMILY))}); {type(base).__name__} "
            f"(model_type {model_type!r}) is not one of them"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(
            f"hidden_act {config.hidden_act!r}: llama.cpp's LLaMA layer computes SiLU-gated MLPs"
        )
    inner: Any = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "embed_tokens") or not hasattr(base, "lm_head"):
        raise ExportError(f"{type(base).__name__} has no model.layers/embed_tokens/lm_head to export")

    widths: list[LayerWidths] = []
    head_dims: set[int] = set()
    epsilons: set[float] = {float(inner.norm.variance_epsilon)}
    for i, layer in enumerate(layers):
        tensors = _layer_tensors(layer)
        unknown = sorted(set(tensors) - set(_LAYER_TENSORS))
        if unknown:
            raise ExportError(
                f"model.layers.{i} holds {unknown}, which a LLaMA-family GGUF layer has no place for"
            )
        attn = layer.self_attn
        hd = int(getattr(attn, "head_dim", 0) or 0)
        missing = sorted(k for k in _REQUIRED if k not in tensors)
        if missing:
            raise ExportError(f"model.layers.{i} lacks {missing}; a LLaMA-family GGUF layer needs them")
        shape = {k: tuple(getattr(*tensors[k]).shape) for k in tensors}
        q, k, v = (
            shape["self_attn.q_proj.weight"],
            shape["self_attn.k_proj.weight"],
            shape["self_attn.v_proj.weight"],
        )
        o, ff = shape["self_attn.o_proj.weight"], shape["mlp.gate_proj.weight"][0]
        if hd <= 0 or q[0] % hd or k[0] % hd or v[0] != k[0] or o[1] != q[0]:
            raise ExportError(
                f"model.layers.{i}.self_attn: q/k/v/o shapes {q}/{k}/{v}/{o} are not whole heads of head_dim {hd}; "
                "GGUF holds attention as whole heads"
            )
        if q[0] == 0 or ff == 0:
            raise ExportError(
                f"model.layers.{i} has no {'attention heads' if q[0] == 0 else 'MLP channels'} left; "
                "llama.cpp's LLaMA graphs need both in every layer"
            )
        head_dims.add(hd)
        widths.append(LayerWidths(q[0] // hd, k[0] // hd, int(ff)))
        epsilons.update(
            float(n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)
        )
    if len(head_dims) != 1:
        raise ExportError(
            f"head_dim differs between layers ({sorted(head_dims)}); GGUF has one attention.key_length for all layers"
        )
    if len(epsilons) != 1:
        raise ExportError(
            f"RMSNorm epsilons differ ({sorted(epsilons)}); GGUF has one layer_norm_rms_epsilon"
        )
    theta, factor = _rope_config(config)
    embed = inner.embed_tokens.weight
    head = base.lm_head.weight
    tied = bool(getattr(config, "tie_word_embeddings", False)) or head.data_ptr() == embed.data_ptr()
    if tied and not torch.equal(head, embed):
        raise ExportError("config ties lm_head to the embedding but their weights differ")
    plan = GgufPlan(
        arch=FAMILY[model_type],
        model_type=model_type,
        n_embd=int(embed.shape[1]),
        n_vocab=int(embed.shape[0]),
        head_dim=head_dims.pop(),
        layers=tuple(widths),
        rms_eps=epsilons.pop(),
        rope_theta=theta,
        rope_linear_factor=factor,
        context_length=int(getattr(config, "max_position_embeddings", 0) or 0),
        tied=tied,
    )
    if not plan.uniform:
        plan = GgufPlan(**{**plan.__dict__, "arch": "deci"})
    return plan


def rope_interleave(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows (or biases) of each head from transformers' half-split rope to adjacent pairs.

    Example:
        >>> rope_interleave(torch.arange(8), 2).tolist()   # two heads of head_dim 4
        [0, 2, 1, 3, 4, 6, 5, 7]
    """
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _lora_wrappers(base: nn.Module) -> dict[str, nn.Module]:
    """Qualified name of a peft LoRA layer with unmerged active adapters -> the layer."""
    out = {}
    for name, m in base.named_modules():
        lora_a = getattr(m, "lora_A", None)
        if (
            not isinstance(lora_a, nn.ModuleDict)
            or not hasattr(m, "base_layer")
            or getattr(m, "merged", False)
        ):
            continue
        if getattr(m, "disable_adapters", False):
            continue
        active = [a for a in getattr(m, "active_adapters", []) if a in lora_a]
        if active:
            out[name] = m
    return out


def gguf_tensors(
    model: nn.Module, plan: GgufPlan, dtype: str = "f16", *, merge_lora: bool = False
) -> Iterator[tuple[str, np.ndarray, Any]]:
    """``(gguf name, array, raw GGML type or None)`` for every tensor of the file, in file order."""
    import gguf

    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: GGUF export writes {sorted(DTYPES)}")
    base: Any = hf_base_model(model)
    assert base is not None
    wrappers = _lora_wrappers(base)
    if wrappers and not merge_lora:
        raise ExportError(
            f"{len(wrappers)} modules carry unmerged LoRA adapters (e.g. {next(iter(wrappers))}); llama.cpp would "
            "run the base weights without them. Pass merge_lora=True (CLI: --merge-lora) to fold them into the "
            "exported weights, or merge_and_unload() first"
        )
    target = DTYPES[dtype]

    def weight(module_path: str) -> torch.Tensor:
        """``module_path.weight`` with the active LoRA deltas of its wrapper folded in."""
        wrapper: Any = wrappers.get(module_path)
        owner: Any = base.get_submodule(module_path)
        while hasattr(owner, "base_layer"):
            owner = owner.base_layer
        w = owner.weight.detach()
        if wrapper is not None:
            w = w + sum(
                wrapper.get_delta_weight(a).to(w.dtype)
                for a in wrapper.active_adapters
                if a in wrapper.lora_A
            )
        return w

    def bias(module_path: str) -> torch.Tensor | None:
        owner: Any = base.get_submodule(module_path)
        while hasattr(owner, "base_layer"):
            owner = owner.base_layer
        b = getattr(owner, "bias", None)
        return None if b is None else b.detach()

    def array(t: torch.Tensor) -> tuple[np.ndarray, Any]:
        t = t.detach().to("cpu")
        if t.dim() == 1 or target == torch.float32:
            return t.to(torch.float32).contiguous().numpy(), None
        if target == torch.bfloat16:
            return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(
                np.uint16
            ), gguf.GGMLQuantizationType.BF16
        return t.to(torch.float16).contiguous().numpy(), None

    permute = plan.arch in _NORM_ROPE
    inner: Any = base.model
    yield ("token_embd.weight", *array(inner.embed_tokens.weight))
    for i, widths in enumerate(plan.layers):
        prefix = f"model.layers.{i}"
        layer = inner.layers[i]
        for key, name in _LAYER_TENSORS.items():
            module_path, attr = key.rsplit(".", 1)
            owner: Any = layer.get_submodule(module_path)
            if attr == "weight" and not isinstance(owner, nn.Linear) and not hasattr(owner, "base_layer"):
                t: torch.Tensor | None = owner.weight.detach()  # a norm
            elif attr == "weight":
                t = weight(f"{prefix}.{module_path}")
            else:
                t = bias(f"{prefix}.{module_path}")
            if t is None:
                continue
            if permute and module_path in ("self_attn.q_proj", "self_attn.k_proj"):
                t = rope_interleave(
                    t, widths.n_head if module_path == "self_attn.q_proj" else widths.n_head_kv
                )
            yield (f"blk.{i}.{name}", *array(t))
    yield ("output_norm.weight", *array(inner.norm.weight))
    if not plan.tied:
        yield ("output.weight", *array(weight("lm_head")))


def _file_type(dtype: str) -> int:
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    }[dtype]


def _write_header(writer: Any, plan: GgufPlan, vocab: GgufVocab, dtype: str, name: str) -> None:
    writer.add_type("model")
    writer.add_name(name)
    if plan.context_length:
        writer.add_context_length(plan.context_length)
    writer.add_embedding_length(plan.n_embd)
    writer.add_block_count(len(plan.layers))
    writer.add_feed_forward_length(plan.per_layer("n_ff"))
    writer.add_head_count(plan.per_layer("n_head"))
    writer.add_head_count_kv(plan.per_layer("n_head_kv"))
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    writer.add_rope_freq_base(plan.rope_theta)
    if plan.rope_linear_factor is not None:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(plan.rope_linear_factor)
    writer.add_layer_norm_rms_eps(plan.rms_eps)
    writer.add_vocab_size(plan.n_vocab)
    writer.add_file_type(_file_type(dtype))

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):  # fmt: skip
        if role in ids:
            add(ids[role])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def check_output(
    path: str | os.PathLike[str], *, force: bool = False, inputs: Iterable[str | os.PathLike[str] | None] = ()
) -> Path:
    """The output file path, refused when it exists (unless ``force``) or is a directory
    (:class:`~shear.errors.ExportError`), and by the output guard
    (:func:`shear.io.outputs.check_output_file`: a symbolic link, a path inside or equal to one
    of ``inputs``, such as the model or tokenizer folder, :class:`~shear.errors.OutputError`)."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give the path of the .gguf file to write")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass force=True (CLI: --force) to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} does not exist; create the folder first")
    return check_output_file(out, overwrite=force, inputs=inputs)


def _non_finite(tensors: list[tuple[str, np.ndarray, Any]]) -> list[str]:
    """Names of the tensors about to be written that hold NaN or Inf (bf16 is stored as raw uint16)."""
    bad = []
    for name, data, raw in tensors:
        if raw is not None and data.dtype == np.uint16:  # bf16 bits: exponent all ones is Inf or NaN
            if bool(((data & 0x7F80) == 0x7F80).any()):
                bad.append(name)
        elif np.issubdtype(data.dtype, np.floating) and not bool(np.isfinite(data).all()):
            bad.append(name)
    return bad


def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    dtype: str = "f16",
    merge_lora: bool = False,
    force: bool = False,
    name: str | None = None,
    pre: str | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``model`` (LLaMA, Mistral, Qwen2, SmolLM2; pruned or not) as a GGUF file llama.cpp runs.

    ``tokenizer`` is a transformers fast tokenizer or the folder holding ``tokenizer.json``
    (required: llama.cpp tokenizes from the file). ``dtype`` is ``f16`` (default), ``bf16`` or
    ``f32``. ``merge_lora`` folds unmerged LoRA adapters into the written weights (the model is
    not changed); without it they are refused. ``pre`` names llama.cpp's pre-tokenizer when
    shear's table does not know the tokenizer's. The file is written to a temporary sibling and
    renamed into place, so a failure leaves nothing; an existing ``path`` is replaced only with
    ``force=True``. A tensor holding NaN or Inf as written (a damaged model, or an f16 overflow) is an
    :class:`ExportError` naming it, unless ``allow_nonfinite=True``. Returns the path.
    """
    import gguf

    source = getattr(getattr(hf_base_model(model), "config", None), "_name_or_path", "") or ""
    folders = [f for f in (tokenizer, source) if isinstance(f, (str, os.PathLike)) and Path(f).expanduser().is_dir()]
    out = check_output(path, force=force, inputs=folders)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: GGUF export writes {sorted(DTYPES)}")
    plan = plan_gguf(model)
    if tokenizer is None:
        raise ExportError(
            "GGUF files carry the tokenizer: pass tokenizer= (a tokenizer or the folder with tokenizer.json)"
        )
    vocab = read_vocab(tokenizer, plan.n_vocab, pre=pre)
    tensors = list(
        gguf_tensors(model, plan, dtype, merge_lora=merge_lora)
    )  # every refusal happens before writing
    bad = [] if allow_nonfinite else _non_finite(tensors)
    if bad:
        raise ExportError(
            f"{len(bad)} tensors hold NaN or Inf as written in {dtype} (e.g. {', '.join(bad[:3])}); llama.cpp would "
            "produce garbage. Reload or repair the model (a value past 65504 overflows f16: try dtype='bf16'), "
            f"or pass allow_nonfinite=True (CLI: --allow-nonfinite) to write it anyway; nothing was written to {out}"
        )
    base = hf_base_model(model)
    label = (
        name
        or Path(str(getattr(getattr(base, "config", None), "_name_or_path", "") or out.stem)).name
        or out.stem
    )

    with atomic_file(out) as tmp:  # replaces only what check_output saw; never what appeared meanwhile
        writer = gguf.GGUFWriter(tmp, plan.arch)
        try:
            _write_header(writer, plan, vocab, dtype, label)
            for tensor_name, data, raw in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out
