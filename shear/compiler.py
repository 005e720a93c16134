"""``shear.compile``: run a pruning pipeline on a model and return the (smaller) model.

The module is named ``compiler`` rather than ``compile`` on purpose: a submodule
``shear/compile.py`` would replace the function ``shear.compile`` with the module object the first
time anything imported it.

Example:
    >>> import shear
    >>> small = shear.compile(model, ["random{ratio=0.3,seed=0}", "erase"], example_inputs=x)  # doctest: +SKIP
    >>> print(small.shear_report)          # per-pass time, per-group sizes and params  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shear.codegen.verify import NOISE_FACTOR, allowed, compute_dtype, rounding_noise, upcast
from shear.errors import ModelError, PipelineError, ShearError, VerifyError
from shear.model.devices import model_device, model_dtype
from shear.model.facts import base_weight_name, forward_logits, is_lora_param
from shear.model.target import Target, parse_target
from shear.passes.base import Context, Options, Pass, pruned_kinds
from shear.passes.manager import PassManager, PassRecord
from shear.passes.pipeline import PipelineSpec
from shear.report.summary import CompileReport, ReportBuilder

__all__ = ["compile", "default_example_inputs", "reference_output", "EquivalenceCheck"]


def default_example_inputs(model: nn.Module, seq_len: int = 16) -> dict[str, torch.Tensor] | None:
    """Deterministic token ids for a model with a ``config.vocab_size`` (a causal LM), else ``None``."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        seq_len = min(seq_len, limit)
    gen = torch.Generator().manual_seed(0)  # drawn on the CPU: the same ids on every device
    return {"input_ids": torch.randint(0, vocab, (1, seq_len), generator=gen).to(model_device(model))}


def _to_device(x: Any, device: torch.device | None) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def reference_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on example inputs (tuple, dict, or tensor) and return its main output tensor
    (:func:`shear.model.facts.forward_logits`); a :class:`VerifyError` when it has none."""
    try:
        return forward_logits(model, inputs)
    except ModelError as e:
        raise VerifyError(f"{e}; nothing to compare: pass verify=False") from None


class EquivalenceCheck:
    """A pass hook: a pass that changes parameter shapes must keep the model's function.

    Before such a pass the model is the masked original (pruned structures are zero); after it,
    the smaller model must give the same outputs on the example inputs, within ``tol`` (an absolute
    tolerance) or, by default, :func:`shear.codegen.verify.allowed`: the one policy that
    ``erase``'s own check uses, with the model's floating-point rounding noise when the difference
    exceeds the plain tolerance. 16-bit models are run in fp32, one block converted at a time
    (:func:`shear.codegen.verify.upcast`), so a right erase passes and a wrong one fails in any dtype.
    """

    def __init__(self, inputs: Any, tol: float | None = None) -> None:
        self.inputs = inputs
        self.tol = tol
        self.max_diff: float | None = None
        self._ref: torch.Tensor | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._disabled = False

    def _forward(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), upcast(model, compute_dtype(model_dtype(model))):
                return reference_output(model, self.inputs).detach().float().cpu()
        finally:
            model.train(was_training)

    @staticmethod
    def _shape_map(model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Shapes of the model's own weights: LoRA adapters and peft's renaming do not count, so
        adding or merging adapters is not a shape change (erasing structures is)."""
        return {
            base_weight_name(n): tuple(t.shape)
            for n, t in model.named_parameters(remove_duplicate=False)
            if not is_lora_param(n)
        }

    def before_pass(self, p: Pass, ctx: Context) -> None:
        if self._disabled:
            return
        self._shapes = self._shape_map(ctx.model)
        if self._ref is None:
            try:
                self._ref = self._forward(ctx.model)
            except Exception as e:  # noqa: BLE001 - reported as a warning: the check cannot run
                self._disabled = True
                ctx.warn(f"equivalence check skipped: the model does not run on the example inputs ({type(e).__name__}: {e})")

    def after_pass(self, p: Pass, record: PassRecord, ctx: Context) -> None:
        if self._disabled or self._ref is None:
            return
        if self._shape_map(ctx.model) == self._shapes:
            if record.changed:
                self._ref = None  # weights changed: take a new reference before the next pass
            return
        own = record.stats.get("max_diff")
        if self.tol is None and isinstance(own, float):
            # the pass verified itself under the same policy (erase, with what it rescaled on purpose)
            self.max_diff = max(own, self.max_diff or 0.0)
            record.stats["verify_max_diff"] = own
            self._ref = None
            return
        try:
            out = self._forward(ctx.model)
        except Exception as e:
            raise VerifyError(f"the model no longer runs after pass {p.name!r}: {type(e).__name__}: {e}") from e
        ref = self._ref
        if out.shape != ref.shape:
            raise VerifyError(f"pass {p.name!r} changed the output shape from {tuple(ref.shape)} to {tuple(out.shape)}")
        scale = float(ref.abs().max())
        diff = float((out - ref).abs().max())
        if self.tol is not None:
            tol, noise = self.tol, None
        else:
            tol = allowed(scale)
            noise = rounding_noise(ctx.model, self.inputs, [out]) if diff > tol else None
        self.max_diff = max(diff, self.max_diff or 0.0)
        record.stats["verify_max_diff"] = diff
        if noise is not None:
            record.stats["verify_rounding_noise"] = noise
        if not diff <= (tol if self.tol is not None else allowed(scale, noise)):
            floor = f" + {NOISE_FACTOR:g} * fp rounding noise {noise:.3g}" if noise is not None else ""
            raise VerifyError(
                f"pass {p.name!r} changed the model's function: max |diff| {diff:.3g} > tolerance {tol:.3g}{floor} "
                f"between the masked model before it and the smaller model after it on the example inputs"
            )
        self._ref = out


def compile(  # noqa: A001 - mirrors torch.compile; the public name is shear.compile
    model: nn.Module,
    passes: PipelineSpec = None,
    example_inputs: Any = None,
    data: Any = None,
    verify: bool | float = True,
    inplace: bool = False,
    device: str | torch.device | None = None,
    debug: bool = False,
    dump_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    report: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    evaluate: bool | str | Any = False,
    target: str | Target | None = "auto",
) -> nn.Module:
    """Run a pruning pipeline on ``model`` and return the transformed model with its report.

    Args:
        model: the model to prune; copied first unless ``inplace=True``.
        passes: pass objects, a pipeline string (``"random{ratio=0.3,seed=0},erase"``), a path
            to a TOML/YAML pipeline, or a list of these; ``None`` runs the LoRAShear pipeline
            (``LORASHEAR_PIPELINE``) on a causal LM given ``data``, else ``DEFAULT_PIPELINE``.
        example_inputs: what the model is called with (tuple, dict or tensor); for a causal LM
            with a config, 16 deterministic token ids are used when omitted.
        data: calibration / training data for passes that need it.
        verify: check that every pass that changes parameter shapes keeps the function of the
            masked model on ``example_inputs``; a float sets the absolute tolerance. ``False`` skips
            every check, ``erase``'s own included (as ``erase{verify=false}`` does for one erase).
        inplace: transform ``model`` itself instead of a deep copy.
        device: move the model and inputs there first.
        debug: check IR invariants after every pass (also on under pytest or ``SHEAR_DEBUG=1``).
        dump_dir: write the printed IR (and SVG with graphviz) after every pass; a folder holding
            files shear did not write there is refused before any work (:mod:`shear.io.outputs`).
        progress: render progress bars with rich on stderr.
        report: write the self-contained HTML report (:mod:`shear.report`) to this path; an
            existing file, a folder, a symbolic link is refused before any work.
        overwrite: replace an existing ``report`` file, and files of the same names in ``dump_dir``.
        evaluate: measure quality before the passes and after them and judge the result
            (:mod:`shear.evaluation.verdict`): ``True``/``"quick"`` (seconds), ``"full"``, or an
            ``EvalSize``; needs ``data`` to be a ``TextData`` (else skipped with a warning). The verdict
            is ``small.shear_report.verdict`` and the first section of the report.
        target: where the model will run (:mod:`shear.model.target`): ``"auto"``, a format and/or a
            device (``"nas,cuda"``, ``"cpu"``, ``"hf"``) or a :class:`~shear.model.target.Target`.
            Passes with ``round_to=0`` keep widths in the target's steps and ``selection=auto``
            follows its layout; ``auto`` reads the device from the model and picks ``nas`` when the
            model fits it, else ``shear``. ``None``: no target (any width, uniform selection).

    Returns:
        The transformed model, same class as the input where the passes keep it (codegen slices
        the module tree in place), with a :class:`~shear.report.summary.CompileReport` attached as
        ``model.shear_report``.

    Raises:
        PipelineError: the pipeline is malformed or empty (before anything runs).
        OutputError: ``report`` or ``dump_dir`` would replace files shear did not write (before anything runs).
        InputError: the model or ``example_inputs`` cannot be pruned as given (meta or NaN weights,
            token ids outside the vocabulary, integer inputs to a float model), or ``target`` names
            an unknown word, before anything runs.
        DataError: ``data`` holds token ids outside the vocabulary.
        PassError: a pass failed; names it and the passes before it.
        VerifyError: a shape-changing pass changed the model's function.

    Example:
        >>> small = shear.compile(model, "random{ratio=0.3,seed=0},erase", example_inputs=x)  # doctest: +SKIP
        >>> small.shear_report.params_after < small.shear_report.params_before              # doctest: +SKIP
        True
    """
    from shear.io.outputs import check_output_file, check_writable_dir
    from shear.io.targets import target_for
    from shear.preflight import check_compile_inputs, check_verify_option
    from shear.progress import RichSink
    from shear.report.quality import QualityCheck, check_evaluate_option

    notes: list[str] = []
    if isinstance(passes, str) and not passes.strip() or isinstance(passes, (list, tuple)) and not passes:
        raise PipelineError(
            f"the pipeline is empty ({passes!r}); pass passes=None (or omit --passes) for the default pipeline, "
            'or name the passes, e.g. "random{ratio=0.3,seed=0},erase"'
        )
    wanted = parse_target(target) if target is not None else None
    if passes is None:
        passes, notes = _default_passes(model, data)
    manager = PassManager(passes, check=True if debug else None, dump_dir=dump_dir, overwrite=overwrite)
    check_verify_option(verify)
    check_evaluate_option(evaluate)
    check_compile_inputs(
        model, example_inputs if example_inputs is not None else default_example_inputs(model), data,
        reads_weights=any(p.reads_weights for p in manager.passes),
    )
    if dump_dir is not None:
        check_writable_dir(dump_dir, overwrite=overwrite)
    if report is not None:
        check_output_file(report, overwrite=overwrite)
    original = model
    model, dev, example_inputs = _working_copy(model, inplace, device, example_inputs)
    resolved = target_for(wanted, model, device=dev, kinds=pruned_kinds(manager.passes)) if wanted is not None else None
    ctx = Context(
        model=model,
        example_inputs=example_inputs,
        data=data,
        device=dev,
        progress_sink=RichSink() if progress else None,
        # the caller's untouched model: the dense teacher of passes such as ebft
        dense=None if inplace else original,
        # verify=False also turns off every erase's own check (erase reads ctx.options.verify)
        options=Options(dump_dir=Path(dump_dir) if dump_dir is not None else None, verify=verify is not False,
                        target=resolved),
    )
    for note in notes:
        ctx.warn(note)
    quality, skipped = QualityCheck.start(model, data, evaluate, sink=ctx.progress_sink)
    if skipped:
        ctx.warn(skipped)
    builder = ReportBuilder(model)
    hooks: list[Any] = [builder]
    check = None
    if verify is not False and example_inputs is not None:
        check = EquivalenceCheck(example_inputs, None if verify is True else float(verify))
        hooks.append(check)
    manager.hooks = hooks
    records = manager.run(ctx)
    summary: CompileReport = builder.finish(ctx, records)
    summary.verify_max_diff = check.max_diff if check is not None else None
    if quality is not None:
        summary.verdict = quality.finish(ctx.model, dense=None if inplace else original, warn=summary.warnings.append)
    summary.target = resolved.to_dict() if resolved is not None else None
    _attach_report(ctx, summary, report)
    result = ctx.model
    object.__setattr__(result, "shear_report", summary)  # a plain attribute, not a submodule or buffer
    return result


def _working_copy(
    model: nn.Module, inplace: bool, device: str | torch.device | None, example_inputs: Any
) -> tuple[nn.Module, torch.device | None, Any]:
    """The model the passes transform (a deep copy unless ``inplace``, moved to ``device``), the device,
    and the example inputs on the weights' device (16 token ids for a causal LM when none are given)."""
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as e:
            raise ShearError(
                f"could not copy {type(model).__name__} (compile copies unless inplace=True): {e}. "
                "Pass inplace=True to transform the model itself"
            ) from e
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        model = model.to(dev)
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    # inputs follow the weights (a model already on a GPU needs no device=...)
    target = dev if dev is not None else model_device(model)
    return model, dev, _to_device(example_inputs, None if target.type == "meta" else target)


def _attach_report(ctx: Context, summary: CompileReport, path: str | os.PathLike[str] | None) -> None:
    """Gather the HTML report's data into ``summary.details`` and write the page to ``path``.

    The pruned model matters more than its report: a failure here becomes a warning, not an error.
    """
    from shear.report import collect, write_html

    try:
        summary.details = collect(ctx, summary)
        if path is not None:
            write_html(summary.details, path)
    except Exception as e:  # noqa: BLE001 - reported, and the model is still returned
        summary.warnings.append(f"report: could not write {path or 'the report data'}: {type(e).__name__}: {e}")


def _default_passes(model: nn.Module, data: Any) -> tuple[list[str], list[str]]:
    """The default pipeline for ``model``, without passes that are not registered (and why).

    The LoRAShear pipeline trains, so without ``data`` a causal LM gets ``DEFAULT_PIPELINE`` (the IR
    only) and a note saying how to prune it.
    """
    from shear.passes.pipeline import DEFAULT_PIPELINE, LORASHEAR_PIPELINE, default_pipeline
    from shear.passes.registry import import_errors, registered_passes

    names = list(default_pipeline(model))
    notes = []
    if tuple(names) == LORASHEAR_PIPELINE and data is None:
        names = list(DEFAULT_PIPELINE)
        notes.append(
            "compile: the default pipeline of a causal LM is LoRAShear, which trains and needs data; without "
            "data only discover-groups ran. Prune with shear.compile(model, data=TextData.from_corpus(tokenizer))"
        )
    known = registered_passes()
    missing = [n for n in names if n not in known]
    if missing:
        broken = import_errors()
        notes.append(
            f"default pipeline: left out {', '.join(missing)} (not registered"
            + (f"; import errors: {broken}" if broken else "")
            + ")"
        )
    return [n for n in names if n in known], notes
