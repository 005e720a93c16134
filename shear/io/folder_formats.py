"""Which serving format a saved folder is in, and where it loads: ``hf``, ``nas`` or ``shear``.

The serving target decides the folder :func:`shear.save` writes (``target=``):

========  ==========================================================================================
``hf``    every layer has the same widths and ``config.json`` says them: stock transformers'
          ``from_pretrained`` (no shear import), vLLM and every Hugging Face reader load it
``nas``   NVIDIA's Nemotron-NAS / DeciLM checkpoint (:mod:`shear.io.nas`): per-layer MLP widths in
          multiples of 256, read by vLLM, TensorRT-LLM, MLX and llama.cpp's converter
``shear`` any model :func:`shear.load` rebuilds (per-layer widths of any kind, LoRA adapters,
          GraphModules); when stock transformers cannot build it, ``config.json`` makes it fail
          with a message naming ``shear.load``, never a size mismatch
``auto``  the most widely loadable of the three that holds the model: ``hf``, else ``nas``, else ``shear``
========  ==========================================================================================

:func:`choose_format` resolves a target for a model (an explicit ``hf``/``nas`` that cannot hold it
is an :class:`~shear.errors.ExportError` naming why and the fix); :func:`describe_folder` reads a
saved folder's ``shear.json`` back into a :class:`FolderFormat` that says where it loads.

Example:
    >>> save_format("nas,cuda")
    'nas'
    >>> FolderFormat("nas", ("vLLM", "shear.load"), ("stock transformers",)).line("out")
    'saved to out as nas: loads in vLLM and shear.load; not in stock transformers'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from shear.codegen.hf_config import hf_base_model, layer_widths
from shear.errors import CheckpointError, ExportError, InputError
from shear.io.manifest_schema import check_manifest
from shear.io.nas import NasPlan, block_widths, plan_nas
from shear.io.safe_archive import read_json_file

__all__ = [
    "SAVE_FORMATS", "FolderFormat", "choose_format", "describe_folder", "llama_cpp_converts", "save_format",
    "uniform_problem",
]

SAVE_FORMATS = ("auto", "hf", "nas", "shear")
"""The folder formats :func:`shear.save` writes (``auto`` picks one)."""
_LLAMA_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""Model classes whose uniform folder llama.cpp's converter and ``shear export`` both read."""
_DEVICE_WORDS = ("cpu", "cuda")
"""Words of a ``--target`` that name a device, not a folder format."""


def save_format(target: Any) -> str:
    """The folder format a target asks for: a word of :data:`SAVE_FORMATS`, a ``--target`` spec such as
    ``"nas,cuda"``, or an object with a ``format`` attribute. ``gguf`` (a file, not a folder) and a bare
    device mean ``auto``. :class:`InputError` for anything else, naming the words allowed."""
    spec = target if isinstance(target, str) or target is None else getattr(target, "format", target)
    if spec is None:
        return "auto"
    if not isinstance(spec, str):
        raise InputError(f"target={target!r}: give one of {', '.join(SAVE_FORMATS)} (optionally with a device, 'nas,cuda')")
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    formats = [w for w in words if w not in _DEVICE_WORDS]
    unknown = [w for w in formats if w not in (*SAVE_FORMATS, "gguf")]
    if unknown or len(formats) > 1:
        raise InputError(
            f"target {spec!r}: {'unknown word ' + repr(unknown[0]) if unknown else 'two formats'}; a saved folder is one "
            f"of {', '.join(SAVE_FORMATS)} (gguf files come from shear export), optionally with a device (cpu, cuda)"
        )
    return formats[0] if formats and formats[0] != "gguf" else "auto"


def _spread(values: list[int]) -> str:
    by: dict[int, list[int]] = {}
    for i, v in enumerate(values):
        by.setdefault(v, []).append(i)
    parts = [f"{v} in layer{'s' if len(ix) > 1 else ''} {', '.join(map(str, ix[:4]))}{', ...' if len(ix) > 4 else ''}"
             for v, ix in sorted(by.items(), key=lambda kv: len(kv[1]))]
    return "; ".join(parts[:3]) + ("; ..." if len(parts) > 3 else "")


def uniform_problem(model: nn.Module) -> str:
    """Why ``config.json`` cannot say ``model``'s sizes (which widths differ between which layers)."""
    widths = layer_widths(model)
    if widths:
        named = {"query heads": [w.n_head for w in widths], "kv heads": [w.n_head_kv for w in widths],
                 "head sizes": [w.head_dim for w in widths], "MLP widths": [w.n_ff for w in widths]}
        differ = [f"{name} differ between layers ({_spread(v)})" for name, v in named.items() if len(set(v)) > 1]
        if differ:
            return "; ".join(differ)
    return ("transformers' config cannot say these sizes (widths that differ between layers, a residual that is not "
            "a multiple of the head count, or norms with different epsilons)")


def _adapter_problem(model: nn.Module) -> str | None:
    from shear.model.facts import is_lora_param

    lora = [n for n, _ in model.named_parameters() if is_lora_param(n)]
    if not lora:
        return None
    return (f"it carries {len(lora)} unmerged LoRA tensors (e.g. {lora[0]}), which only shear.load puts back; end the "
            "pipeline with merge-lora (or call merge_and_unload()) for a folder other engines load")


def choose_format(model: nn.Module, target: str, compatible: bool) -> tuple[str, str, NasPlan | None]:
    """``(format, note, nas plan)`` for saving ``model`` with ``target`` (a word of :data:`SAVE_FORMATS`).

    ``compatible``: a plain ``from_pretrained`` rebuilds the model from its refreshed config
    (:func:`shear.codegen.hf_config.refresh_config`). ``note`` says why ``auto`` did not pick a more
    widely loadable format (empty otherwise). An explicit ``hf`` or ``nas`` that cannot hold the model
    is an :class:`ExportError` naming why and the fix; nothing is written.
    """
    if target == "shear":
        return "shear", "", None
    hf = hf_base_model(model)
    adapters = _adapter_problem(model)
    if target == "hf":
        if hf is None:
            raise ExportError(f"target='hf': {type(model).__name__} is not a transformers model; save it with "
                              "target='shear' (shear.load)")
        if adapters:
            raise ExportError(f"target='hf': {adapters}")
        if not compatible:
            raise ExportError(
                f"target='hf': stock from_pretrained builds one width per kind for every layer, and this model's "
                f"{uniform_problem(model)}. Prune with --target hf (shear.compile(..., target='hf'): selection=shared, "
                "the same widths in every layer), or save with target='nas' (vLLM, TensorRT-LLM, llama.cpp) or "
                "target='shear' (shear.load)"
            )
        return "hf", "", None
    if target == "nas":
        return "nas", "", plan_nas(model)
    if hf is None:
        return "shear", f"{type(model).__name__} is not a transformers model", None
    if adapters:
        return "shear", adapters, None
    if compatible:
        return "hf", "", None
    why = uniform_problem(model)
    try:
        return "nas", f"not hf: {why}", plan_nas(model)
    except ExportError as e:
        return "shear", f"not hf: {why}; not nas: {e}", None


@dataclass(frozen=True)
class FolderFormat:
    """Where a saved folder loads."""

    format: str
    """``hf``, ``nas`` or ``shear``."""
    loads_in: tuple[str, ...]
    not_in: tuple[str, ...] = ()
    note: str = ""
    """Why a more widely loadable format did not hold the model (empty when none was passed over)."""

    def line(self, where: str | os.PathLike[str]) -> str:
        """One line for the console: ``saved to OUT as nas: loads in A, B and C; not in D``."""
        ins = list(self.loads_in)
        said = ", ".join(ins[:-1]) + (" and " if len(ins) > 1 else "") + ins[-1]
        out = f"saved to {where} as {self.format}: loads in {said}"
        return out + (f"; not in {', '.join(self.not_in)}" if self.not_in else "")


def llama_cpp_converts(folder: str | os.PathLike[str], vocab_size: int) -> bool:
    """Whether llama.cpp's ``convert_hf_to_gguf.py`` reads this Nemotron-NAS folder's vocabulary: its DeciLM
    class reads a LLaMA-3 vocabulary (128256 tokens) or a SentencePiece-style BPE (byte fallback); any
    other (SmolLM2's or Qwen2's byte-level BPE) stops it, and ``shear export`` writes the GGUF instead."""
    if vocab_size == 128256:
        return True
    f = Path(folder) / "tokenizer.json"
    if not f.is_file():
        return False
    try:
        doc = read_json_file(f, str(f), 256 << 20)
    except CheckpointError:
        return False
    model = doc.get("model") if isinstance(doc, dict) else None
    decoder = doc.get("decoder") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or not isinstance(decoder, dict):
        return False
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def describe_folder(path: str | os.PathLike[str]) -> FolderFormat:
    """Where the folder ``path`` written by :func:`shear.save` loads, read from its ``shear.json``.

    Example:
        >>> describe_folder("out").line("out")                          # doctest: +SKIP
        'saved to out as nas: loads in vLLM (--trust-remote-code), TensorRT-LLM, MLX, ... and shear.load; ...'
    """
    path = Path(path)
    manifest = check_manifest(read_json_file(path / "shear.json", f"{path}/shear.json", 256 << 20), f"{path}/shear.json")
    fmt = manifest.get("target", "shear")
    note = str(manifest.get("target_note", ""))
    if fmt == "hf":
        cpp = ("llama.cpp (convert_hf_to_gguf.py, or shear export)",) if manifest["class"] in _LLAMA_CLASSES else ()
        return FolderFormat("hf", ("stock transformers (from_pretrained, no shear needed)", "vLLM", *cpp,
                                   "shear.load"), (), note)
    if fmt == "nas":
        shapes = manifest.get("shapes", {})
        vocab = int(shapes.get("model.embed_tokens.weight", [0])[0])
        config = read_json_file(path / "config.json", f"{path}/config.json", 64 << 20)
        skips = any(heads and not ff for heads, _, ff in block_widths(config, f"{path}/config.json"))
        not_in = ["stock transformers (its config.json names the loaders)"]
        loads = ["vLLM (--trust-remote-code)", "TensorRT-LLM", "MLX"]
        if skips:
            not_in.append("llama.cpp (its deci graph skips a layer whose MLP is no_op, attention included)")
        elif llama_cpp_converts(path, vocab):
            loads.append("llama.cpp (convert_hf_to_gguf.py)")
        else:
            loads.append("llama.cpp through shear export (convert_hf_to_gguf.py's DeciLM reads only LLaMA-3 and "
                         "SentencePiece vocabularies)")
        return FolderFormat("nas", (*loads, "shear.load"), tuple(not_in), note)
    if manifest.get("graph_module"):
        return FolderFormat("shear", ("shear.load (a torch.export program)",), ("stock transformers",), note)
    stock = manifest.get("transformers") and manifest.get("config_file", "config.json") == "config.json"
    if stock and manifest.get("peft") is None:
        return FolderFormat("shear", ("shear.load", "stock transformers (from_pretrained)"), (), note)
    if stock:
        return FolderFormat("shear", ("shear.load (with its LoRA adapters)",
                                      "stock transformers + peft (the base, then adapter/)"), (), note)
    return FolderFormat("shear", ("shear.load",),
                        ("stock transformers (its config.json says to use shear.load)",
                         "llama.cpp (shear export writes a GGUF for LLaMA-family models)"), note)
