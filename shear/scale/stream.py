"""Prune a safetensors checkpoint larger than memory: plan, score and erase, tensor by tensor.

:func:`prune_streamed` never holds the model: the groups come from the config on the meta device
(:mod:`shear.scale.source`), the magnitude scores from one tensor at a time
(:mod:`shear.scale.scores`), and erasure reads each source tensor, drops the erased rows and
columns (:func:`shear.codegen.module_tree.drop_indices`, the in-memory codegen's own slicing), rescales
the RMS norms over a shrunk width, and appends it to the output shard it came from
(:class:`~shear.scale.writer.SafetensorsWriter`). The shapes, the refreshed config and the module
attributes come from applying the same :class:`~shear.codegen.module_tree.ErasurePlan` to the meta
skeleton, so the output equals what the in-memory magnitude choice
(:func:`~shear.passes.baselines.magnitude.prune_lowest_norm` with the same counts) and ``erase``
save. ``ratio`` is the share of the parameters (as ``shear prune --ratio``); ``group_ratio`` the
share of every group (``shear.compile(model, "magnitude{ratio=...},erase")`` exactly):
:mod:`shear.scale.counts`.

The output directory is a shear checkpoint: the shards (same names as the source's) and their
index, ``config.json`` (sizes refreshed where transformers can express them), the non-persistent
buffers, tokenizer and generation files copied from the source, and ``shear.json`` with every
file's sha256, so :func:`shear.load` reads it, and ``from_pretrained`` does where the config can
say the pruned sizes. The source is opened read-only and never written; the output is checked
before any work (never the source, nor inside it) and swapped in atomically
(:func:`shear.io.outputs.atomic_dir`).

Example:
    >>> report = prune_streamed("llama-7b", "llama-7b-pruned", ratio=0.2)      # doctest: +SKIP
    >>> print(report.format())                                                  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shear.codegen.module_tree import ErasurePlan, apply_plan, drop_indices, plan_removal
from shear.errors import CheckpointError, PipelineError
from shear.io.outputs import atomic_dir, check_output_dir
from shear.io.targets import target_for
from shear.model.target import Target, parse_target
from shear.passes.options import require_number
from shear.scale.counts import check_ratios, structure_counts
from shear.scale.scores import TensorKeys, stream_magnitude, tensor_keys
from shear.scale.shards import INDEX, ShardedCheckpoint
from shear.scale.source import ModelSource, open_source
from shear.scale.writer import SafetensorsWriter

__all__ = ["Stage", "StreamReport", "prune_streamed", "write_pruned", "measure_stage", "CRITERIA", "COPIED_FILES"]

CRITERIA = ("magnitude",)
"""Criteria that stream (they need weights but no training and no calibration data)."""

COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
"""Files of the source directory copied next to the pruned weights (data files only)."""


@dataclass(frozen=True)
class Stage:
    """Wall time and peak resident memory of one stage (measured)."""

    name: str
    seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class StreamReport:
    """What :func:`prune_streamed` did."""

    output: Path
    params_before: int
    params_after: int
    structures_removed: int
    from_pretrained_compatible: bool
    stages: tuple[Stage, ...]
    notes: tuple[str, ...] = field(default=())
    structures_pruned: int = 0
    """Structures of the groups of the kinds pruned (what the group ratio is a share of)."""
    target: str = ""
    """The resolved target, as :meth:`shear.model.target.Target.describe` says it."""

    def format(self) -> str:
        """The stage table (measured wall time and peak RSS) and the parameter counts."""
        red = 1 - self.params_after / max(self.params_before, 1)
        lines = [f"{'stage':<24} {'wall s':>8} {'peak RSS MB':>12}"]
        lines += [f"{s.name:<24} {s.seconds:>8.1f} {s.peak_rss_bytes / 2**20:>12.0f}" for s in self.stages]
        share = f" ({self.structures_removed / self.structures_pruned:.1%} of the pruned kinds' structures)" if self.structures_pruned else ""
        lines.append(
            f"{self.structures_removed:,} structures erased{share}: {self.params_before:,} -> {self.params_after:,} "
            f"parameters (-{red:.1%} of the parameters); wrote {self.output}"
            + ("" if self.from_pretrained_compatible else " (shear.load only)")
        )
        if self.target:
            lines.append(self.target)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _status_bytes(field_name: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def measure_stage(name: str, out: list[Stage]) -> Iterator[None]:
    """Record the wall time and the peak RSS of the block (Linux VmHWM, reset at the start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then covers the process's life so far: an upper bound
    t0 = time.perf_counter()
    yield
    out.append(Stage(name, time.perf_counter() - t0, _status_bytes("VmHWM")))


def _buffers(src: ModelSource, config: Any) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (RoPE ``inv_freq``) computed on the CPU by rebuilding their modules
    from the config; they own no parameters, so this costs kilobytes."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, mod in src.model.named_modules():
        names = [k for k, v in mod._buffers.items() if v is not None and k in mod._non_persistent_buffers_set]
        if not names:
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            raise CheckpointError(f"{mod_name} ({type(mod).__name__}) has parameters and computed buffers; cannot rebuild it alone")
        try:
            with torch.device("cpu"):
                fresh = type(mod)(config=config)
        except Exception as e:  # noqa: BLE001 - any failure means this architecture's buffers are unknown
            raise CheckpointError(
                f"cannot compute the buffers {names} of {mod_name} ({type(mod).__name__}) from the config "
                f"({type(e).__name__}: {e}); streaming supports modules built as Module(config=...)"
            ) from e
        for k in names:
            out[f"{mod_name}.{k}" if mod_name else k] = fresh._buffers[k].detach().clone()
    return out


def _norm_weights(src: ModelSource, keys: TensorKeys, plan: ErasurePlan) -> dict[str, tuple[Any, int, int]]:
    """Canonical norm weight -> (its RmsNormSpec, width before, width after) for norms erase rescales."""
    from shear.graph.modules.norms import find_rms_norm

    out = {}
    for module_name, (d, d_new) in plan.norms.items():
        spec = find_rms_norm(src.model.get_submodule(module_name))
        if spec is None:
            raise CheckpointError(f"norm {module_name} is not a known RMS norm; cannot rescale it while streaming")
        out[keys.table.resolve(f"{module_name}.weight")] = (spec, d, d_new)
    return out


def write_pruned(
    ckpt: ShardedCheckpoint, src: ModelSource, chosen: dict[int, torch.Tensor], tmp: Path, *,
    keys: TensorKeys | None = None, on_tensor: Callable[[str], None] | None = None,
) -> tuple[ErasurePlan, bool]:
    """Write the pruned checkpoint into the (empty) directory ``tmp``; return the plan and whether a
    plain ``from_pretrained`` can rebuild it. Mutates ``src.model`` into the pruned meta skeleton."""
    from shear.codegen.hf_config import candidate_config_updates, refresh_config, unloadable_config
    from shear.io.checkpoint import (
        FORMAT,
        SHEAR_CONFIG,
        SHEAR_ONLY_NOTE,
        VERSION,
        module_attributes,
        record_files,
    )

    keys = keys or tensor_keys(ckpt, src)
    config0 = copy.deepcopy(src.model.config)
    plan = plan_removal(src.model, src.graph.pruning_groups, chosen)
    norms = _norm_weights(src, keys, plan)
    buffers = _buffers(src, config0)
    apply_plan(src.model, plan)
    compatible = refresh_config(src.model)
    by_file: dict[str, list[str]] = {}
    out_key = {key: canon for canon, key in keys.key.items()}
    for key in ckpt.order():
        if key in out_key:
            by_file.setdefault(ckpt.tensors[key].file, []).append(key)
    weight_map: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    total = 0
    for file in ckpt.files:
        names = by_file.get(file, [])
        if not names:
            continue
        entries = []
        for key in names:
            canon = out_key[key]
            info = ckpt.tensors[key]
            shape = plan.shape_after(canon)
            entries.append((canon, info.dtype, shape))
            weight_map[canon] = file
            dtypes[canon] = str(info.dtype).removeprefix("torch.")
            shapes[canon] = list(shape)
        with SafetensorsWriter(tmp / file, entries) as w:
            for key in names:
                canon = out_key[key]
                t = ckpt.read(key)
                cuts = plan.cuts.get(canon)
                if cuts:
                    t = drop_indices(t, cuts)
                if canon in norms:
                    spec, d, d_new = norms[canon]
                    t = spec.scale_weight(t.clone() if not cuts else t, d, d_new)
                total += t.numel() * t.element_size()
                w.write(canon, t)
                del t
                if on_tensor is not None:
                    on_tensor(canon)
    if ckpt.sharded:
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    from safetensors.torch import save_file

    save_file(buffers, str(tmp / "shear_buffers.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt.root / "config.json").read_text())
    if compatible:
        cfg.update(candidate_config_updates(src.model) or {})
    cfg.setdefault("architectures", [type(src.model).__name__])
    # per-layer widths: the real config goes where shear.load reads it, and config.json makes stock
    # transformers refuse the folder naming shear.load, never build it with the old sizes
    config_file = "config.json" if compatible else SHEAR_CONFIG
    (tmp / config_file).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if not compatible:
        refused = unloadable_config(cfg, type(src.model.config), SHEAR_ONLY_NOTE)
        (tmp / "config.json").write_text(json.dumps(refused, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if (ckpt.root / name).is_file():
            shutil.copyfile(ckpt.root / name, tmp / name)
    aliases = {
        name: canon for name, canon in keys.table.canonical.items()
        if name != canon and canon in shapes
    }
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "class": type(src.model).__name__,
        "class_module": type(src.model).__module__,
        "transformers": True,
        "shapes": {**shapes, **{k: list(v.shape) for k, v in buffers.items()}},
        "dtypes": {**dtypes, **{k: str(v.dtype).removeprefix("torch.") for k, v in buffers.items()}},
        "aliases": aliases,
        "requires_grad": sorted(c for c in shapes if keys.table.is_param.get(c, False)),
        "module_attrs": module_attributes(src.model),
        "none_modules": [],
        "peft": None,
        "weights": [f for f in ckpt.files if f in by_file],
        "files": {},
        "target": "hf" if compatible else "shear",
        "target_note": "" if compatible else SHEAR_ONLY_NOTE,
        "config_file": config_file,
    }
    record_files(tmp, manifest)
    (tmp / "shear.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return plan, compatible


def prune_streamed(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    ratio: float | None = None,
    *,
    criterion: str = "magnitude",
    round_to: int = 0,
    overwrite: bool = False,
    integrity: bool = False,
    layers: str = "stamp",
    progress: Callable[[str, str], None] | None = None,
    group_ratio: float | None = None,
    kinds: tuple[str, ...] | None = None,
    target: str | Target | None = "auto",
) -> StreamReport:
    """Prune the safetensors checkpoint in ``model`` by ``criterion`` into ``output``: ``ratio`` of the
    parameters (0.2 when neither ratio is given), or ``group_ratio`` of every group's structures
    (:mod:`shear.scale.counts`), widths in the ``target``'s steps (``round_to`` > 0 overrides them).

    With ``group_ratio`` and ``round_to=1`` (or ``target=None``) it equals
    ``shear.save(shear.compile(model, "magnitude{ratio=...},erase"), output)`` without ever holding
    the model; see the module doc. ``integrity`` also checks the source shards' sha256 where a
    ``shear.json`` lists them. ``progress(stage, tensor)`` is called after each tensor.

    Raises:
        PipelineError: an unknown criterion, both ratios, or a ratio outside (0, 1).
        CheckpointError: a shard is missing, truncated or corrupt, or does not match config.json.
        OutputError: ``output`` exists (without ``overwrite``), is or lies inside the source, or
            its disk lacks the space.
    """
    from shear.codegen.hf_config import hf_base_model  # noqa: F401  (transformers is needed below)
    from shear.kernels.allocation import ParamBudget

    if criterion not in CRITERIA:
        raise PipelineError(
            f"stream-prune: criterion {criterion!r} does not stream; choose from {', '.join(CRITERIA)} "
            "(activation and Taylor criteria need calibration data or gradients: prune in memory with shear.compile)"
        )
    ratio, group_ratio, chosen_kinds = check_ratios("stream-prune", ratio, group_ratio, kinds)
    require_number("stream-prune", "round_to", round_to, integer=True, low=0, high=1 << 20)
    wanted = parse_target(target) if target is not None else None
    stages: list[Stage] = []
    source = Path(model).expanduser()
    with measure_stage("plan (meta)", stages):
        ckpt = ShardedCheckpoint.open(source, integrity=integrity)
        out = check_output_dir(output, overwrite=overwrite, inputs=[source], needed_bytes=ckpt.nbytes())
        src = open_source(source, layers=layers)
        keys = tensor_keys(ckpt, src)
        budget = ParamBudget(src.model, src.graph.pruning_groups)
        resolved = target_for(wanted, src.model) if wanted is not None else None
        want = structure_counts(src.model, src.graph.pruning_groups, ratio=ratio, group_ratio=group_ratio,
                                kinds=chosen_kinds, target=resolved, round_to=round_to)  # fmt: skip
    tick = (lambda stage: (lambda name: progress(stage, name))) if progress is not None else (lambda stage: None)
    with measure_stage("saliency (magnitude)", stages):
        chosen = stream_magnitude(ckpt, src, 0.0, keys=keys, on_tensor=tick("saliency"), counts=want)
    with measure_stage("erase + write", stages):
        with atomic_dir(out) as tmp:
            _, compatible = write_pruned(ckpt, src, chosen, tmp, keys=keys, on_tensor=tick("erase"))
    counts = {gid: int(idx.numel()) for gid, idx in chosen.items()}
    notes = [f"left out {len(keys.extra)} checkpoint tensors the model does not have (e.g. {keys.extra[0]})"] if keys.extra else []
    return StreamReport(
        output=out,
        params_before=budget.total,
        params_after=budget.params_after(counts),
        structures_removed=sum(counts.values()),
        from_pretrained_compatible=compatible,
        stages=tuple(stages),
        notes=tuple(notes),
        structures_pruned=sum(g.size for g in src.graph.pruning_groups if g.id in want),
        target=resolved.describe() if resolved is not None else "",
    )
