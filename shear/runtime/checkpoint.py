"""Save and load pruned models exactly, including non-uniformly pruned ones and their LoRA adapters.

A checkpoint directory holds:

* ``model.safetensors`` — the base model's state dict (tied tensors once), loadable by a plain
  transformers ``from_pretrained`` when the pruned sizes are uniform and the config accepts them;
* ``config.json`` (+ ``generation_config.json``) — the transformers config, sizes refreshed where
  uniform (:mod:`shear.runtime.hf_config`);
* ``shear_buffers.safetensors`` — non-persistent buffers (RoPE ``inv_freq``, ...);
* ``adapter/`` — peft's own adapter format, when the model is a ``PeftModel``;
* ``shear.json`` — the shear section: class, per-tensor shapes and dtypes, tied aliases, freeze flags,
  module attributes that are not in tensors (rescaled RMSNorm epsilons), file sizes and sha256.

A ``torch.fx.GraphModule`` that erase emitted (:mod:`shear.runtime.graph_codegen`) is saved instead
as ``program.pt2`` (``torch.export.save`` of the program, weights inside) plus ``shear.json``, and
:func:`load` needs no model for it.

:func:`load` builds the model from its config on the meta device, resizes every tensor to its
recorded shape, updates module attributes with the same rule table codegen uses, and assigns the
saved tensors. Writes are atomic: everything goes to a temporary sibling directory that is renamed
into place only when complete, so a crash never leaves a half-written model that loads.

Example:
    >>> import shear, torch                                 # doctest: +SKIP
    >>> shear.save(small, "out/pruned")                     # doctest: +SKIP
    >>> again = shear.load("out/pruned")                    # doctest: +SKIP
    >>> plain = transformers.AutoModelForCausalLM.from_pretrained("out/pruned")  # uniform sizes only  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shear.errors import CheckpointError, GraphError
from shear.runtime.hf_config import hf_base_model, refresh_config
from shear.runtime.masks import TensorTable
from shear.runtime.module_rules import find_rms_norm, update_module_attributes

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "shear-checkpoint"
VERSION = 1
_WEIGHTS = "model.safetensors"
_BUFFERS = "shear_buffers.safetensors"
_MANIFEST = "shear.json"
_ADAPTER = "adapter"
_PROGRAM = "program.pt2"


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _base_module(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


def _base_name(name: str) -> str | None:
    """Name of a tensor of a peft-injected base model in the plain base model (None for LoRA tensors)."""
    if "lora_" in name:
        return None
    return name.replace(".base_layer.", ".")


def _base_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str], dict[str, bool]]:
    """(persistent tensors, non-persistent buffers, aliases, requires_grad) of the plain base model."""
    table = TensorTable(_base_module(model))
    persistent: set[str] = set()
    for mod_name, mod in _base_module(model).named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        persistent.update(prefix + k for k in mod._parameters if mod._parameters[k] is not None)
        persistent.update(prefix + k for k in mod._buffers if k not in mod._non_persistent_buffers_set)
    tensors: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    grads: dict[str, bool] = {}
    for name, canon in table.canonical.items():
        base_name, base_canon = _base_name(name), _base_name(canon)
        if base_name is None or base_canon is None:
            continue
        if name != canon:
            aliases[base_name] = base_canon
            continue
        t = table.tensors[canon].detach()
        (tensors if name in persistent else buffers)[base_name] = t.contiguous()
        if table.is_param[canon]:
            grads[base_name] = bool(table.tensors[canon].requires_grad)
    return tensors, buffers, aliases, grads


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _module_attrs(model: nn.Module) -> dict[str, dict[str, float]]:
    """Attributes that live outside tensors and erasure changes: RMS-norm epsilons."""
    out: dict[str, dict[str, float]] = {}
    for name, mod in _base_module(model).named_modules():
        spec = find_rms_norm(mod)
        if spec is not None and getattr(mod, spec.eps_attr, None) is not None:
            out[name] = {spec.eps_attr: float(getattr(mod, spec.eps_attr))}
    return out


def _none_modules(model: nn.Module, hf: nn.Module | None) -> list[str]:
    """Submodule slots that are None in the saved model but built by its config's skeleton.

    E.g. ``BertModel(config, add_pooling_layer=False)`` sets ``pooler = None``, which the config alone
    does not say; :func:`load` sets those slots to None again.
    """
    if hf is None:
        return []
    base = _base_module(model)
    have = {n for n, _ in base.named_modules()}
    have |= {b for b in (_base_name(n + ".") for n in have) if b is not None}
    have = {n.rstrip(".") for n in have}
    try:
        with torch.device("meta"):
            skel = type(hf)._from_config(hf.config)
    except Exception:  # the config cannot build a skeleton; load will say so
        return []
    out = []
    for name, _ in skel.named_modules():
        if not name or name in have:
            continue
        parent, _, attr = name.rpartition(".")
        try:
            owner = base.get_submodule(parent)
        except AttributeError:
            continue
        if getattr(owner, attr, "missing") is None:
            out.append(name)
    return out


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` (rename), else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (a transformers model, a PeftModel around one, or any nn.Module) to ``path``.

    Returns the directory. An existing directory is replaced atomically.
    """
    path = Path(path)
    if isinstance(model, torch.fx.GraphModule) and "shear_inputs" in model.meta:
        return _save_graph_module(model, path)
    hf = hf_base_model(model)
    if hf is not None:
        refresh_config(model)
    tensors, buffers, aliases, grads = _base_tensors(model)
    base = _base_module(model)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "class": type(hf if hf is not None else base).__name__,
        "class_module": type(hf if hf is not None else base).__module__,
        "transformers": hf is not None,
        "shapes": {k: list(v.shape) for k, v in {**tensors, **buffers}.items()},
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in {**tensors, **buffers}.items()},
        "aliases": aliases,
        "requires_grad": sorted(k for k, v in grads.items() if v),
        "module_attrs": _module_attrs(model),
        "none_modules": _none_modules(model, hf),
        "peft": None,
        "files": {},
    }
    with _atomic_dir(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        save_file({k: v.cpu() for k, v in buffers.items()}, str(tmp / _BUFFERS), metadata={"format": "pt"})
        if hf is not None:
            hf.config.save_pretrained(tmp)
            gen = getattr(hf, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
        if _is_peft(model):
            model.save_pretrained(tmp / _ADAPTER)
            manifest["peft"] = {
                "dir": _ADAPTER,
                "requires_grad": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            }
        for f in (_WEIGHTS, _BUFFERS):
            manifest["files"][f] = {"size": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def _save_graph_module(gm: torch.fx.GraphModule, path: Path) -> Path:
    from shear.runtime.graph_codegen import export_graph_module

    program = export_graph_module(gm)
    constants = gm.meta.get("shear_constants", {})
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "class": "GraphModule", "class_module": "torch.fx",
        "transformers": False, "graph_module": {"file": _PROGRAM, "constants": constants},
        "requires_grad": sorted(n for n, p in gm.named_parameters() if p.requires_grad), "files": {},
    }
    with _atomic_dir(path) as tmp:
        torch.export.save(program, str(tmp / _PROGRAM))
        manifest["files"][_PROGRAM] = {"size": (tmp / _PROGRAM).stat().st_size, "sha256": _sha256(tmp / _PROGRAM)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def _load_graph_module(path: Path, manifest: dict[str, Any], device: str | torch.device) -> nn.Module:
    from shear.runtime.graph_codegen import finish_graph_module

    info = manifest["graph_module"]
    try:
        program = torch.export.load(str(path / info["file"]))
    except Exception as e:  # noqa: BLE001 - any unreadable archive is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot read {info['file']} ({type(e).__name__}: {e}); re-save the model") from e
    gm = finish_graph_module(program.module(), info["constants"])
    if program.example_inputs is not None:  # so that shear.save can export it again
        gm.meta["shear_inputs"] = program.example_inputs
    grads = set(manifest["requires_grad"])
    for n, p in gm.named_parameters():
        p.requires_grad_(n in grads)
    return gm.to(device).eval()


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a directory written by shear.save")
    mf = path / _MANIFEST
    if not mf.is_file():
        raise CheckpointError(
            f"{path} is not a shear checkpoint (no {_MANIFEST}); write it with shear.save, or load a plain "
            "transformers directory with from_pretrained"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf} is corrupt ({e}); re-save the model") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is not a {FORMAT} manifest; re-save the model with shear.save")
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(f"{mf} has format version {manifest['version']}; this shear reads up to {VERSION}")
    return manifest


def _check_files(path: Path, manifest: dict[str, Any], integrity: bool) -> None:
    for f, info in manifest["files"].items():
        p = path / f
        if not p.is_file():
            raise CheckpointError(f"{path}: missing {f}; the checkpoint is incomplete, re-save it")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {f} has {p.stat().st_size} bytes, expected {info['size']} (corrupt or truncated)")
        if integrity and _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{path}: {f} fails its sha256 check (corrupt); re-save the model")


def _skeleton(path: Path, manifest: dict[str, Any]) -> nn.Module:
    if not manifest["transformers"]:
        raise CheckpointError(
            f"{path} holds a plain {manifest['class']} (not a transformers model): pass an unpruned instance, "
            "shear.load(path, model=...), to load into"
        )
    import transformers

    cls = getattr(transformers, manifest["class"], None)
    if cls is None:
        try:
            cls = getattr(importlib.import_module(manifest["class_module"]), manifest["class"])
        except (ImportError, AttributeError):
            raise CheckpointError(f"{path}: unknown model class {manifest['class']}") from None
    try:
        config = cls.config_class.from_pretrained(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}/config.json cannot be read as a {cls.config_class.__name__}: {e}") from e
    archs = getattr(config, "architectures", None) or [manifest["class"]]
    if manifest["class"] not in archs:
        raise CheckpointError(f"{path}: config.json is for {archs}, shear.json for {manifest['class']}: mismatched directory")
    with torch.device("meta"):
        return cls._from_config(config)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in the manifest")
    return dt


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, device: str | torch.device = "cpu",
    integrity: bool = True,
) -> nn.Module:
    """Load a checkpoint written by :func:`save`, with exactly its pruned (possibly per-layer) sizes.

    ``model``: for non-transformers models, an unpruned instance of the same architecture to resize and
    fill in place (transformers models are rebuilt from config.json; GraphModules from their program).
    ``integrity`` checks sha256.
    The result is in eval mode; a PeftModel comes back with its adapters and freeze flags.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    _check_files(path, manifest, integrity)
    if manifest.get("graph_module"):
        return _load_graph_module(path, manifest, device)
    base = _skeleton(path, manifest) if model is None else model
    for slot in manifest.get("none_modules", []):
        parent, _, attr = slot.rpartition(".")
        try:
            owner = base.get_submodule(parent)
        except AttributeError:
            continue
        if getattr(owner, attr, None) is not None:
            setattr(owner, attr, None)
    table = TensorTable(base)
    shapes: dict[str, list[int]] = manifest["shapes"]
    expected = set(shapes) | set(manifest["aliases"])
    have = set(table.canonical)
    if expected != have:
        missing, extra = sorted(expected - have), sorted(have - expected)
        raise CheckpointError(
            f"{path} does not match the architecture of {type(base).__name__}: tensors missing from the model "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not in the checkpoint {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}"
        )
    try:
        weights = load_file(str(path / _WEIGHTS), device=str(device))
        weights.update(load_file(str(path / _BUFFERS), device=str(device)))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read the safetensors files ({e}); the checkpoint is corrupt") from e
    grads = set(manifest["requires_grad"])
    for name, shape in shapes.items():
        canon = table.resolve(name)
        old = table.tensors[canon]
        if old.dim() != len(shape):
            raise CheckpointError(
                f"{path}: tensor {name} has {len(shape)} dims, the model's has {old.dim()}: different architecture"
            )
        t = weights.get(name)
        if t is None or list(t.shape) != shape or t.dtype != _dtype(manifest["dtypes"][name]):
            got = None if t is None else (list(t.shape), str(t.dtype))
            raise CheckpointError(f"{path}: tensor {name} is {got} in the weights, the manifest says {shape}: mismatched files")
        if t.data_ptr() % 64:  # safetensors may hand out unaligned views: SIMD paths (and results) would differ
            t = t.clone()
        table.replace(canon, t)
        if table.is_param[canon]:
            table.tensors[canon].requires_grad_(name in grads)
    left = [n for n, t in table.tensors.items() if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: no saved values for {left[:5]}; the checkpoint is incomplete")
    try:
        update_module_attributes(base)
    except GraphError as e:
        raise CheckpointError(f"{path}: the saved shapes do not fit {type(base).__name__}: {e}") from e
    for mod_name, attrs in manifest["module_attrs"].items():
        mod = base.get_submodule(mod_name)
        for k, v in attrs.items():
            setattr(mod, k, v)
    if manifest["transformers"] and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(str(path))
    result: nn.Module = base
    if manifest["peft"] is not None:
        from peft import PeftModel

        result = PeftModel.from_pretrained(base, str(path / manifest["peft"]["dir"]), is_trainable=True)
        trainable = set(manifest["peft"]["requires_grad"])
        for n, p in result.named_parameters():
            p.requires_grad_(n in trainable)
    return result.eval()
