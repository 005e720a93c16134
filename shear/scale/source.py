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
from typing import Any

import torch
from torch import nn

from shear.errors import CheckpointError, GraphError, ModelLoadError
from shear.graph.ir import Graph

__all__ = ["ModelSource", "open_source", "read_config", "meta_model", "block_prefix", "blocks_of", "TRACE_TOKENS"]

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


def read_config(path: str | os.PathLike[str]) -> tuple[Any, Path | None]:
    """The transformers config of a model directory or config JSON file, and the directory (or None)."""
    from transformers import AutoConfig

    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; pass a model directory written by save_pretrained or a config file")
        from shear.runtime.remote_code import refuse_remote_code

        refuse_remote_code(p)  # an auto_map would have transformers offer to run the folder's code
        try:
            return AutoConfig.from_pretrained(str(p), local_files_only=True), p
        except Exception as e:  # noqa: BLE001 - transformers raises several types for a bad config
            raise ModelLoadError(f"{p}/config.json cannot be read by transformers: {type(e).__name__}: {e}") from e
    if not p.is_file():
        raise ModelLoadError(f"{p} does not exist; pass a model directory or a config.json path")
    try:
        data = json.loads(p.read_text())
        kind = data.pop("model_type")
        return AutoConfig.for_model(kind, **data), None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError) as e:
        raise ModelLoadError(f"{p} is not a transformers config JSON with a model_type ({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ModelLoadError(f"{p}: transformers does not know this config: {e}") from e


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
    from shear.runtime.blockwise import BLOCK_PATHS

    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
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
