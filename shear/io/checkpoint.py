"""Save and load pruned models exactly, including non-uniformly pruned ones and their LoRA adapters.

A checkpoint directory holds:

* ``model.safetensors`` — the base model's state dict (tied tensors once), loadable by a plain
  transformers ``from_pretrained`` when the pruned sizes are uniform and the config accepts them;
* ``config.json`` (+ ``generation_config.json``) — the transformers config, sizes refreshed where
  uniform (:mod:`shear.codegen.hf_config`);
* ``shear_buffers.safetensors`` — non-persistent buffers (RoPE ``inv_freq``, ...);
* ``adapter/`` — peft's own adapter format, when the model is a ``PeftModel``;
* tokenizer files, when :func:`save` is given the tokenizer, so the directory is usable on its own;
* ``shear.json`` — the shear section: class, per-tensor shapes and dtypes, tied aliases, freeze flags,
  module attributes that are not in tensors (rescaled RMSNorm epsilons), the serving format the
  folder is in, and the size and sha256 of every other file in the directory.

The serving target (``save(..., target=...)``, :mod:`shear.io.folder_formats`) decides the rest:
``hf`` (uniform widths, the config says them: stock ``from_pretrained`` loads it), ``nas`` (the
Nemotron-NAS checkpoint of :mod:`shear.io.nas`: ``config.json`` for vLLM, TensorRT-LLM and
llama.cpp, the transformers config in ``shear_config.json``), ``shear`` (anything; when stock
transformers cannot build the model, ``config.json`` makes it fail naming ``shear.load`` and the
real config is in ``shear_config.json``), ``auto`` (the first of the three that holds the model).

A ``torch.fx.GraphModule`` that erase emitted (:mod:`shear.codegen.graph_module`) is saved instead
as ``program.pt2`` (``torch.export.save`` of the program, weights inside) plus ``shear.json``, and
:func:`load` needs no model for it.

:func:`load` builds the model from its config on the meta device, resizes every tensor to its
recorded shape, updates module attributes with the same rule table codegen uses, and assigns the
saved tensors.

Safety: :func:`save` refuses an existing non-empty directory unless ``overwrite=True`` and swaps the
new directory in atomically (:mod:`shear.io.outputs`). :func:`load` reads data, never code: JSON,
safetensors and a ``program.pt2`` whose archive holds no pickled objects; the model class comes from
an allow-list (transformers, shear, and the ``classes`` the caller passes), never from a module name
in the file; a file that the manifest does not list, or whose sha256 differs, is refused.

Example:
    >>> import shear, torch                                 # doctest: +SKIP
    >>> shear.save(small, "out/pruned", tokenizer=tok)      # doctest: +SKIP
    >>> again = shear.load("out/pruned")                    # doctest: +SKIP
    >>> plain = transformers.AutoModelForCausalLM.from_pretrained("out/pruned")  # uniform sizes only  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from shear.codegen.hf_config import candidate_config_updates, hf_base_model, refresh_config, unloadable_config
from shear.codegen.module_rules import find_rms_norm, update_module_attributes
from shear.errors import CheckpointError, ExportError, GraphError, OutputError
from shear.io.folder_formats import choose_format, save_format
from shear.io.manifest_schema import check_manifest, check_module_attrs
from shear.io.nas import NasPlan, check_nas_folder, nas_config, nas_weights, write_index
from shear.io.nas_config_code import CONFIG_CODE, CONFIG_CODE_FILE, is_shear_config_code
from shear.io.outputs import atomic_dir, check_output_dir, interrupted_swap, sha256_file
from shear.io.remote_code import refuse_remote_code
from shear.io.safe_archive import check_program_archive, no_pickle, read_json_file
from shear.model.blocks import restore_removed_blocks
from shear.model.devices import check_device
from shear.model.facts import base_weight_name, is_lora_param
from shear.model.tensors import TensorTable

__all__ = ["save", "load", "FORMAT", "SHEAR_CONFIG", "SHEAR_ONLY_NOTE", "VERSION", "module_attributes", "record_files", "weight_files"]

FORMAT = "shear-checkpoint"
VERSION = 3
"""3: the folder's serving format (``target``) and where its transformers config is (``config_file``);
2: every file in the directory is hashed in the manifest (1 hashed only the safetensors files)."""
_OLDEST = 2
"""The oldest version read (1 did not hash every file)."""
_WEIGHTS = "model.safetensors"
SHEAR_CONFIG = "shear_config.json"
_BUFFERS = "shear_buffers.safetensors"
_MANIFEST = "shear.json"
_ADAPTER = "adapter"
_PROGRAM = "program.pt2"
_MAX_MANIFEST = 256 << 20
"""The largest ``shear.json`` read (one of a very large model is a few MiB)."""
_DATA_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".md", ".html")
"""What a checkpoint directory may hold besides the program: data formats that load without running code."""


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _base_module(model: nn.Module) -> nn.Module:
    return model.get_base_model() if _is_peft(model) else model


def _base_name(name: str) -> str | None:
    """Name of a tensor of a peft-injected base model in the plain base model (None for LoRA tensors)."""
    return None if is_lora_param(name) else base_weight_name(name)


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


def module_attributes(model: nn.Module) -> dict[str, dict[str, float]]:
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


def record_files(tmp: Path, manifest: dict[str, Any]) -> None:
    """Size and sha256 of every file written into ``tmp`` (the manifest itself excepted)."""
    manifest["files"] = {
        f.relative_to(tmp).as_posix(): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(tmp.rglob("*")) if f.is_file()
    }


def save(
    model: nn.Module, path: str | os.PathLike[str], *, overwrite: bool = False, tokenizer: Any = None,
    files: Mapping[str, str] | None = None, target: Any = "auto",
) -> Path:
    """Write ``model`` (a transformers model, a PeftModel around one, or any nn.Module) to ``path``.

    ``target`` says where the folder will be loaded (:mod:`shear.io.folder_formats`): ``"hf"`` (stock
    transformers; refused with :class:`~shear.errors.ExportError` unless every layer has the same widths
    and the config says them), ``"nas"`` (the Nemotron-NAS checkpoint vLLM, TensorRT-LLM and llama.cpp
    read; refused unless the format holds the model, :func:`shear.io.nas.plan_nas`), ``"shear"``
    (:func:`load` only, whatever the model), or ``"auto"`` (the default: ``hf``, else ``nas``, else
    ``shear``). A ``--target`` spec (``"nas,cuda"``) or a target object with a ``format`` works too.
    :func:`shear.io.folder_formats.describe_folder` says afterwards which it is and where it loads.

    Returns the directory. ``path`` must not exist or be an empty directory; with ``overwrite=True``
    an existing directory is replaced atomically (the old one or the new one is at ``path`` at every
    instant). A file, the current directory or a read-only directory is never replaced
    (:class:`~shear.errors.OutputError`, before anything is written). ``tokenizer`` (anything with
    ``save_pretrained``) is saved next to the model so the directory is usable on its own.
    ``files`` adds text files (name -> content, e.g. ``{"report.html": ...}``) that are listed and
    hashed in the manifest like the rest; only data suffixes (``.json``, ``.md``, ``.html``, ...).

    Example:
        >>> shear.save(small, "out/pruned", tokenizer=tok)                  # doctest: +SKIP
        >>> shear.save(smaller, "out/pruned")                               # doctest: +SKIP
        Traceback (most recent call last):
        shear.errors.OutputError: output path .../out/pruned holds 5 files (...); pass overwrite=True ...
    """
    wanted = save_format(target)
    needed = sum(t.numel() * t.element_size() for t in model.state_dict().values() if not t.is_meta)
    path = check_output_dir(path, overwrite=overwrite, needed_bytes=needed)
    extra = dict(files or {})
    bad = [f for f in extra if "/" in f or f.startswith(".") or not f.endswith(_DATA_SUFFIXES)]
    if bad:
        raise OutputError(f"save: extra files {bad} must be plain names ending in one of {_DATA_SUFFIXES}")
    if isinstance(model, torch.fx.GraphModule) and "shear_inputs" in model.meta:
        if wanted in ("hf", "nas"):
            raise ExportError(
                f"target={wanted!r}: a GraphModule (the model's code hard-codes a pruned size) has no transformers "
                "class to load it into; save it with target='shear' (shear.load reads the program)"
            )
        return _save_graph_module(model, path, tokenizer, extra)
    hf = hf_base_model(model)
    compatible = refresh_config(model) if hf is not None else False
    fmt, note, plan = choose_format(model, wanted, compatible)
    tensors, buffers, aliases, grads = _base_tensors(model)
    base = _base_module(model)
    config_file = "config.json" if compatible and fmt != "nas" else SHEAR_CONFIG
    manifest: dict[str, Any] = {
        "target": fmt,
        "target_note": note[:4000],
        "format": FORMAT,
        "version": VERSION,
        "class": type(hf if hf is not None else base).__name__,
        "class_module": type(hf if hf is not None else base).__module__,
        "transformers": hf is not None,
        "shapes": {k: list(v.shape) for k, v in {**tensors, **buffers}.items()},
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in {**tensors, **buffers}.items()},
        "aliases": aliases,
        "requires_grad": sorted(k for k, v in grads.items() if v),
        "module_attrs": module_attributes(model),
        "none_modules": _none_modules(model, hf),
        "peft": None,
        "files": {},
    }
    if hf is not None:
        manifest["config_file"] = config_file
    with atomic_dir(path) as tmp:
        weights = nas_weights(tensors, plan) if plan is not None else tensors
        save_file({k: v.cpu() for k, v in weights.items()}, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        if plan is not None:
            write_index(tmp, weights, _WEIGHTS)
        save_file({k: v.cpu() for k, v in buffers.items()}, str(tmp / _BUFFERS), metadata={"format": "pt"})
        if hf is not None:
            _write_configs(tmp, model, hf, config_file, plan)
            gen = getattr(hf, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
        if _is_peft(model):
            model.save_pretrained(tmp / _ADAPTER)
            manifest["peft"] = {
                "dir": _ADAPTER,
                "requires_grad": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            }
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_extra(tmp, extra)
        record_files(tmp, manifest)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


SHEAR_ONLY_NOTE = ("per-layer widths that stock transformers cannot build (see shear.json); load this folder "
                   "with shear.load(path)")
"""What ``config.json`` says, in the field transformers checks first, when only :func:`load` rebuilds the model."""


def _write_configs(tmp: Path, model: nn.Module, hf: nn.Module, config_file: str, plan: NasPlan | None) -> None:
    """``config.json`` for the folder's readers, and the transformers config :func:`load` builds from.

    ``config_file == "config.json"``: the (refreshed) transformers config, which stock transformers
    loads. Otherwise it goes to ``shear_config.json`` and ``config.json`` is the Nemotron-NAS config
    (``plan``) or a copy that transformers refuses with a message naming ``shear.load``
    (:func:`shear.codegen.hf_config.unloadable_config`), never one it would build the wrong sizes from.
    """
    config: Any = hf.config
    config.save_pretrained(tmp)
    if config_file == "config.json":
        return
    (tmp / "config.json").replace(tmp / SHEAR_CONFIG)
    doc = json.loads((tmp / SHEAR_CONFIG).read_text())
    if plan is not None:
        doc = nas_config(model, plan)
        (tmp / CONFIG_CODE_FILE).write_text(CONFIG_CODE, encoding="utf-8")
    else:
        doc = unloadable_config(doc, type(config), SHEAR_ONLY_NOTE)
    (tmp / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _write_extra(tmp: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")


def _save_graph_module(
    gm: torch.fx.GraphModule, path: Path, tokenizer: Any = None, files: Mapping[str, str] | None = None
) -> Path:
    from shear.codegen.graph_module import export_graph_module

    program = export_graph_module(gm)
    constants = gm.meta.get("shear_constants", {})
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "class": "GraphModule", "class_module": "torch.fx", "target": "shear",
        "transformers": False, "graph_module": {"file": _PROGRAM, "constants": constants},
        "requires_grad": sorted(n for n, p in gm.named_parameters() if p.requires_grad), "files": {},
    }
    with atomic_dir(path) as tmp:
        torch.export.save(program, str(tmp / _PROGRAM))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_extra(tmp, files or {})
        record_files(tmp, manifest)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def _load_graph_module(path: Path, manifest: dict[str, Any], device: str | torch.device) -> nn.Module:
    from shear.codegen.graph_module import finish_graph_module, static_inputs

    info = manifest["graph_module"]  # check_manifest: the program is program.pt2
    check_program_archive(path / _PROGRAM)
    try:
        with no_pickle(path / _PROGRAM):
            program = torch.export.load(str(path / _PROGRAM))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable archive is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot read {_PROGRAM} ({type(e).__name__}: {e}); re-save the model") from e
    gm = finish_graph_module(program.module(), info["constants"], static_inputs(program))
    if program.example_inputs is not None:  # so that shear.save can export it again
        gm.meta["shear_inputs"] = program.example_inputs
    grads = set(manifest["requires_grad"])
    for n, p in gm.named_parameters():
        p.requires_grad_(n in grads)
    return gm.to(device).eval()


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        left = interrupted_swap(path)
        if left and not path.exists():
            raise CheckpointError(
                f"{path} is missing: a save into it was interrupted; the previous model is in {left[-1]}. "
                f"Rename it back to {path.name}, or save again"
            )
        raise CheckpointError(f"{path} is not a directory; pass a directory written by shear.save")
    mf = path / _MANIFEST
    if not mf.is_file():
        raise CheckpointError(
            f"{path} is not a shear checkpoint (no {_MANIFEST}); write it with shear.save, or load a plain "
            "transformers directory with from_pretrained"
        )
    manifest = read_json_file(mf, str(mf), _MAX_MANIFEST, fix="Re-save the model with shear.save")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is not a {FORMAT} manifest; re-save the model with shear.save")
    version = manifest.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{mf} has format version {manifest.get('version')}; this shear reads up to {VERSION}")
    if version < _OLDEST:
        raise CheckpointError(
            f"{mf} has format version {version}, which did not hash every file; load it with the shear that wrote "
            "it and save it again with this one"
        )
    return check_manifest(manifest, str(mf))


def _check_files(path: Path, manifest: dict[str, Any], integrity: bool) -> None:
    """Every file present is listed with its size (and sha256), every listed file is present, and
    each is a data format (or the program archive)."""
    listed: dict[str, Any] = manifest["files"]
    present = {f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file() or f.is_symlink()}
    present.discard(_MANIFEST)
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CheckpointError(
            f"{path}: {unlisted[:5]} {'is' if len(unlisted) == 1 else 'are'} not in {_MANIFEST}'s file list, so "
            "their integrity cannot be checked; remove them, or re-save the model"
        )
    if not listed:
        raise CheckpointError(f"{path}: {_MANIFEST} lists no files; the manifest is damaged, re-save the model")
    for f, info in listed.items():  # check_manifest: relative names inside the folder, each with size and sha256
        p = path / f
        if p.is_symlink():
            raise CheckpointError(f"{path}: {f} is a symbolic link; a checkpoint holds plain files, re-save it")
        shear_code = f == CONFIG_CODE_FILE and manifest.get("target") == "nas" and is_shear_config_code(path)
        if f != _PROGRAM and not f.endswith(_DATA_SUFFIXES) and not shear_code:
            raise CheckpointError(
                f"{path}: {f} is not a data file shear loads ({', '.join(_DATA_SUFFIXES)}); a checkpoint never "
                "holds code or pickles. Remove it, or re-save the model"
            )
        if not p.is_file():
            raise CheckpointError(f"{path}: missing {f}; the checkpoint is incomplete, re-save it")
        if p.stat().st_size != info["size"]:
            raise CheckpointError(f"{path}: {f} has {p.stat().st_size} bytes, expected {info['size']} (corrupt or truncated)")
        if integrity and sha256_file(p) != info["sha256"]:
            raise CheckpointError(f"{path}: {f} fails its sha256 check (corrupt); re-save the model")


def _model_class(path: Path, name: str, classes: Sequence[type]) -> type:
    """The class named ``name``: one the caller passed or transformers' own; never imported from a module
    the file names. (shear defines no model class of its own: :mod:`shear.zoo` loads transformers models.)"""
    for cls in classes:
        if cls.__name__ == name:
            return cls
    import transformers
    from transformers import PreTrainedModel

    found: Any = None
    try:
        found = getattr(transformers, name, None) if name.isidentifier() else None
    except Exception:  # noqa: BLE001 - transformers' lazy import of a missing backend
        found = None
    if isinstance(found, type) and issubclass(found, PreTrainedModel):
        return found
    raise CheckpointError(
        f"{path}: model class {name!r} is not a transformers class; shear never imports a module named "
        f"in a checkpoint. Pass the class explicitly: shear.load(path, classes=[{name}])"
    )


def _skeleton(path: Path, manifest: dict[str, Any], classes: Sequence[type]) -> nn.Module:
    if not manifest["transformers"]:
        raise CheckpointError(
            f"{path} holds a plain {manifest['class']} (not a transformers model): pass an unpruned instance, "
            "shear.load(path, model=...), to load into"
        )
    cls: Any = _model_class(path, str(manifest["class"]), classes)
    config_file = manifest.get("config_file", "config.json")
    try:
        if config_file == "config.json":
            config = cls.config_class.from_pretrained(str(path))
        else:
            doc = read_json_file(path / config_file, f"{path}/{config_file}", 64 << 20, fix="Re-save the model")
            config = cls.config_class.from_dict(doc)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}/{config_file} cannot be read as a {cls.config_class.__name__}: {e}") from e
    archs = getattr(config, "architectures", None) or [manifest["class"]]
    if manifest["class"] not in archs:
        raise CheckpointError(f"{path}: {config_file} is for {archs}, shear.json for {manifest['class']}: mismatched directory")
    with torch.device("meta"):
        return restore_removed_blocks(cls._from_config(config))  # erased attention/MLP branches


def _check_config(path: Path, model: nn.Module) -> None:
    """config.json must say the loaded sizes wherever it can (save writes uniform sizes into it): an
    edited config that disagrees with the weights is refused rather than left lying."""
    hf = hf_base_model(model)
    updates = candidate_config_updates(model) if hf is not None else None
    if not updates:
        return
    config = hf.config  # type: ignore[union-attr]
    before = {k: getattr(config, k, None) for k in updates}
    if not refresh_config(model):
        return  # sizes the config cannot express: save left them to shear.json as well
    wrong = {k: (v, getattr(config, k, None)) for k, v in before.items() if getattr(config, k, None) != v}
    if wrong:
        said = "; ".join(f"{k}={c!r} but the weights have {w!r}" for k, (c, w) in wrong.items())
        raise CheckpointError(
            f"{path}/config.json disagrees with the saved weights ({said}); the config was edited or belongs to "
            "another model. Restore it, or re-save the model"
        )


def weight_files(manifest: dict[str, Any]) -> list[str]:
    """The safetensors files holding the weights: ``model.safetensors``, or the shards a streamed
    prune wrote (``manifest["weights"]``; :func:`check_manifest` made each a plain ``.safetensors``
    name the manifest hashes)."""
    files: list[str] = manifest.get("weights", [_WEIGHTS])
    return files


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, device: str | torch.device = "cpu",
    integrity: bool = True, classes: Sequence[type] = (),
) -> nn.Module:
    """Load a checkpoint written by :func:`save`, with exactly its pruned (possibly per-layer) sizes.

    ``model``: for non-transformers models, an unpruned instance of the same architecture to resize and
    fill in place (transformers models are rebuilt from config.json; GraphModules from their program).
    ``classes``: model classes besides transformers' that the checkpoint may name (a
    transformers-style model class of your own); nothing is ever imported by a name read from the files.
    ``integrity`` checks sha256 (file sizes and the file list are always checked).
    The result is in eval mode; a PeftModel comes back with its adapters and freeze flags.

    Example:
        >>> again = shear.load("out/pruned")                            # doctest: +SKIP
        >>> mine = shear.load("out/custom", classes=[MyForCausalLM])    # doctest: +SKIP
    """
    path = Path(path)
    device = check_device(device, "shear.load(device=...)")
    manifest = _read_manifest(path)
    refuse_remote_code(path)
    _check_files(path, manifest, integrity)
    if manifest.get("graph_module"):
        return _load_graph_module(path, manifest, device)
    base = _skeleton(path, manifest, classes) if model is None else model
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
        weights: dict[str, torch.Tensor] = {}
        for file in weight_files(manifest):
            weights.update(load_file(str(path / file), device=str(device)))
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
        if t is None or list(t.shape) != shape or t.dtype != getattr(torch, manifest["dtypes"][name]):
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
    check_module_attrs(base, manifest["module_attrs"], str(path / _MANIFEST))
    for mod_name, attrs in manifest["module_attrs"].items():
        mod = base.get_submodule(mod_name)
        for k, v in attrs.items():
            setattr(mod, k, v)
    _check_config(path, base)  # after the module attributes: the rules read rescaled norm epsilons
    if manifest.get("target") == "nas":
        check_nas_folder(path, base)  # the config other readers build from says these widths
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
