"""A model known by its config alone: the transformers config, a meta-device skeleton, and its groups.

:func:`open_source` accepts a model directory (``config.json``, optionally safetensors weights) or
the path of a config JSON file. Nothing here reads a weight: the skeleton lives on the meta device,
and the pruning groups come from tracing the same architecture with **two** blocks on the meta
device and stamping them onto all blocks (:func:`shear.graph.stamp.stamp_layers`), so a 126-layer
model is planned in about the time of a two-layer one. ``layers="all"`` traces every block instead
(slower; for architectures whose blocks differ).

Example:
    >>> src = open_source("llama-405b/config.json")                      # doctest: +SKIP
    >>> src.num_blocks, src.graph.num_structures() > 0                   # doctest: +SKIP
    (126, True)
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from shear.errors import CheckpointError, GraphError, InputError, ModelLoadError
from shear.graph.ir import Graph
from shear.model.blocks import BLOCK_PATHS, block_path

__all__ = [
    "ModelSource",
    "open_source",
    "read_config",
    "check_config_bounds",
    "estimate_params",
    "meta_model",
    "block_prefix",
    "blocks_of",
    "TRACE_TOKENS",
    "LIMITS",
    "MAX_PARAMS",
]

TRACE_TOKENS = 8
"""Length of the token sequence the template is traced with (shapes do not depend on it)."""


@dataclass(eq=False)
class ModelSource:
    """What planning and streaming know about a model before reading any weight."""

    path: Path
    """The directory, or the config file when a bare config was given."""
    directory: Path | None
    """The model directory (None for a bare config: nothing to stream)."""
    config: Any
    """The transformers ``PretrainedConfig``."""
    model: nn.Module
    """The full model on the meta device (parameters have shapes, no storage)."""
    graph: Graph
    """Pruning groups of the full model (stamped from a two-block trace unless ``layers='all'``)."""
    prefix: str
    """Where the decoder blocks live (``model.layers``)."""
    num_blocks: int
    trace_seconds: float
    stamped: bool


def _config_json(p: Path) -> dict[str, Any]:
    """The JSON object in config file ``p``, its sizes checked (:func:`check_config_bounds`) before
    transformers builds anything from it."""
    try:
        if p.stat().st_size > 16 << 20:
            raise ModelLoadError(f"{p} is larger than 16 MiB; a transformers config is a few kB: check the file")
        data = json.loads(p.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ModelLoadError(f"{p} is nested too deep to be a transformers config; check the file") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{p} is not a readable config JSON ({type(e).__name__}: {e}); check the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelLoadError(f"{p} is not a transformers config JSON with a model_type; pass a model's config.json")
    check_config_bounds(SimpleNamespace(**data), p)
    return data


def read_config(path: str | os.PathLike[str]) -> tuple[Any, Path | None]:
    """The transformers config of a model directory or config JSON file, and the directory (or None).

    The sizes are bounded before transformers reads the file (:func:`check_config_bounds`): a config
    claiming 10**8 layers is an :class:`InputError` at once, not minutes of building."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; pass a model directory written by save_pretrained or a config file")
        from shear.io.remote_code import refuse_remote_code

        refuse_remote_code(p)  # an auto_map would have transformers offer to run the folder's code
        _config_json(p / "config.json")
        try:
            return AutoConfig.from_pretrained(str(p), local_files_only=True), p
        except Exception as e:  # noqa: BLE001 - transformers raises several types for a bad config
            raise ModelLoadError(f"{p}/config.json cannot be read by transformers: {type(e).__name__}: {e}") from e
    if not p.is_file():
        raise ModelLoadError(f"{p} does not exist; pass a model directory or a config.json path")
    data = _config_json(p)
    kind = data.pop("model_type")
    try:
        return AutoConfig.for_model(kind, **data), None
    except Exception as e:  # noqa: BLE001 - unknown model_type, a field of the wrong type, ...
        raise ModelLoadError(f"{p}: transformers cannot build this config ({type(e).__name__}: {str(e)[:300]}); fix the file") from None


LIMITS: dict[str, int] = {
    "num_hidden_layers": 4096,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "moe_intermediate_size": 1 << 22,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 16,
    "vocab_size": 1 << 24,
    "num_local_experts": 1 << 12,
    "num_experts": 1 << 12,
    "n_routed_experts": 1 << 12,
}
"""Largest value a config field may claim (tens of times past any published model): a config past
them describes no model that fits anywhere, and building its skeleton would not finish."""
MAX_PARAMS = 10**14
"""Largest parameter count a config may claim (200 TB of bf16 weights)."""
_MAX_MODULES = 1 << 20
"""Largest module count the meta skeleton may have (layers x experts)."""


def _size(config: Any, name: str, default: int = 0) -> int:
    """The config's integer field ``name`` (never a bool), else ``default``."""
    v = getattr(config, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _experts(config: Any) -> int:
    """Experts per layer the config asks for (1 without experts)."""
    return max(_size(config, "num_local_experts"), _size(config, "num_experts"), _size(config, "n_routed_experts"), 1)


def _about(n: int) -> str:
    """``n`` to three digits (``1.97e+13``), also past the range of a float (a JSON integer may be 10**400)."""
    return f"{n:.3g}" if abs(n) < 10**300 else f"{'-' if n < 0 else ''}1e+{int(n.bit_length() * 0.30103)}"


def estimate_params(config: Any) -> int:
    """Parameters the config asks for, from its sizes alone (attention, MLP or experts, embeddings).

    Example:
        >>> from types import SimpleNamespace as C
        >>> estimate_params(C(num_hidden_layers=2, hidden_size=4, intermediate_size=8, vocab_size=10,
        ...                   num_attention_heads=2, tie_word_embeddings=True))
        360
    """
    h, layers = _size(config, "hidden_size"), _size(config, "num_hidden_layers")
    heads = _size(config, "num_attention_heads", 1) or 1
    hd = _size(config, "head_dim") or h // heads
    kv = _size(config, "num_key_value_heads") or heads
    ffn = _size(config, "moe_intermediate_size") or _size(config, "intermediate_size") or 4 * h
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    mlp = 3 * h * ffn * _experts(config)
    embeddings = _size(config, "vocab_size") * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings


def check_config_bounds(config: Any, where: str | os.PathLike[str]) -> None:
    """Refuse a config that asks for more than can fit, before anything is built.

    Each size field must be a positive integer within :data:`LIMITS`, and the parameter estimate
    (:func:`estimate_params`) at most :data:`MAX_PARAMS`; an :class:`InputError` names the file, the
    field (as the file spells it: ``n_layer`` in a GPT-2 config) or the estimate, and the fix. A config
    claiming 10**8 layers is refused in microseconds instead of building a skeleton that never finishes.
    """
    params = estimate_params(config)
    spelled = getattr(config, "attribute_map", None) or {}  # transformers' name -> the file's (n_layer)
    for name, limit in LIMITS.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            shown = repr(value) if len(repr(value)) < 40 else repr(value)[:40] + "..."
            estimate = f"; with it the config asks for about {_about(params)} parameters" if isinstance(value, int) and value > limit else ""
            raise InputError(
                f"{where}: {spelled.get(name, name)} = {shown} is not a size shear can plan (a positive integer at most "
                f"{limit:,}{estimate}); fix the config (is it the right file?)"
            )
    if params > MAX_PARAMS:
        raise InputError(
            f"{where}: the config asks for about {params:.3g} parameters ({2 * params / 1e12:.3g} TB of bf16 weights), "
            f"more than the {MAX_PARAMS:.0e} shear plans; fix the sizes in the config (num_hidden_layers, hidden_size, "
            "intermediate_size, vocab_size)"
        )
    layers, experts = _size(config, "num_hidden_layers", 1), _experts(config)
    if layers * experts > _MAX_MODULES:
        raise InputError(
            f"{where}: {layers:,} layers x {experts:,} experts is more modules than a skeleton can hold "
            f"(at most {_MAX_MODULES:,}); fix the config"
        )


def meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` on the meta device (its class comes from transformers' own mapping)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - unknown architecture or invalid sizes
        raise ModelLoadError(f"cannot build a {type(config).__name__} causal LM on the meta device: {type(e).__name__}: {e}") from e


def block_prefix(model: nn.Module) -> str:
    """The module path of the decoder blocks (``model.layers`` for LLaMA-style models)."""
    path = block_path(model)
    if path is not None:
        return path
    raise GraphError(f"{type(model).__name__}: no decoder blocks at {', '.join(BLOCK_PATHS)}; cannot plan it block by block")


def blocks_of(model: nn.Module, prefix: str) -> nn.ModuleList:
    """The decoder blocks at ``prefix`` (see :func:`block_prefix`)."""
    blocks = model.get_submodule(prefix)
    if not isinstance(blocks, nn.ModuleList):
        raise GraphError(f"{type(model).__name__}.{prefix} is a {type(blocks).__name__}, not a list of blocks")
    return blocks


def _two_block_config(config: Any) -> Any:
    small = copy.deepcopy(config)
    small.num_hidden_layers = 2
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and types:
        if len(set(types)) > 1:
            raise GraphError(
                f"{type(config).__name__}: blocks are of different types ({sorted(set(types))}); stamping needs identical "
                "blocks, trace the full model instead (layers='all')"
            )
        small.layer_types = list(types[:2])
    return small


def _trace(model: nn.Module) -> Graph:
    from shear.graph import trace

    return trace(model, {"input_ids": torch.zeros(1, TRACE_TOKENS, dtype=torch.long)})


def open_source(path: str | os.PathLike[str], *, layers: str = "stamp") -> ModelSource:
    """Read the config at ``path``, build the meta skeleton, and find the pruning groups.

    ``layers``: ``"stamp"`` (trace two blocks, stamp the rest) or ``"all"`` (trace every block).
    """
    from shear.graph.stamp import stamp_layers

    if layers not in ("stamp", "all"):
        raise GraphError(f"layers must be 'stamp' or 'all', got {layers!r}")
    config, directory = read_config(path)
    check_config_bounds(config, directory / "config.json" if directory is not None else Path(path))
    model = meta_model(config)
    prefix = block_prefix(model)
    n = len(blocks_of(model, prefix))
    t0 = time.perf_counter()
    if layers == "all" or n < 3:
        graph, stamped = _trace(model), False
    else:
        template = meta_model(_two_block_config(config))
        graph, stamped = stamp_layers(_trace(template), prefix, n), True
    seconds = time.perf_counter() - t0
    if directory is not None and (directory / "shear.json").is_file() and not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: a shear checkpoint without config.json cannot be planned")
    return ModelSource(Path(path), directory, config, model, graph, prefix, n, seconds, stamped)
