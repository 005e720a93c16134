"""Numerical equivalence of the emitted small model and the masked original.

:func:`record` runs the masked model once on the example inputs and keeps its final outputs and
(up to a memory budget) every module's output, in completion order. After codegen sliced the model,
:func:`check` runs the small model with forward hooks, compares each module output whose shape did
not change against the recording, and raises :class:`~shear.errors.VerifyError` naming the max
difference and the first diverging module. One forward pass each: cheap enough to leave on.

Deep models in fp32 are not exact: erasing zeros changes the order of floating-point sums, and
through 30 layers with large activations (SmolLM2's logits reach ~35) that moves the logits by up
to ~1e-4 of their scale, about as far as the masked model itself is from exact arithmetic. When a
difference exceeds the plain tolerance, :func:`rounding_noise` measures that floor (the small model
in float64 against itself in its own compute dtype), and the check accepts
``diff <= atol + rtol * scale + NOISE_FACTOR * noise`` (:func:`allowed`, the one tolerance policy,
which ``shear.compile``'s equivalence check uses too).

Low precision: a 16-bit model is never compared in 16 bits (a right erase of a LLaMA-7B shape in
bf16 moves the logits by 0.43, as far as some wrong ones). :func:`record` and :func:`check` run it
in fp32 with :func:`upcast`, which converts one decoder block (or one module outside the blocks) at
a time during its own forward and puts the 16-bit tensors back after it: the weights are exactly
the 16-bit values, so masked and small model differ by fp32 summation noise only, and the memory is
that of the model plus one fp32 block. The float64 reference of :func:`rounding_noise` streams the
same way, so it needs no copy of the model at any size.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    >>> x = torch.randn(2, 3)
    >>> rec = record(net, x)
    >>> check(net, rec, x) <= 1e-6
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.errors import ShearError, VerifyError
from shear.graph.trace import normalize_inputs
from shear.model.blocks import decoder_blocks
from shear.model.devices import model_dtype

__all__ = [
    "call_model", "flatten_tensors", "Recording", "record", "check", "tolerance", "allowed", "rounding_noise",
    "compute_dtype", "upcast", "widened_graph", "NOISE_BUDGET_BYTES", "NOISE_FACTOR", "UPCAST_BLOCK_BYTES",
]

NOISE_BUDGET_BYTES = 256 << 20
"""Largest float64 copy of a whole model :func:`rounding_noise` makes (32M parameters); a larger
model is upcast block by block (:func:`upcast`) instead of copied (a copy of a 1B model in float64
is four times its bf16 weights)."""
UPCAST_BLOCK_BYTES = 64 << 20
"""The most :func:`upcast` converts at once, where it can split: a decoder block larger than this once
converted is converted layer by layer, and a plain ``nn.Linear`` outside the blocks (the output head)
is computed in blocks of output rows of at most this size. The fp32 copy of a tied 128k-vocabulary
head is as large as the whole 16-bit model of a small LLaMA; an fp32 block of a LLaMA-1B shape is a
quarter of its bf16 weights when only four layers are kept."""
NOISE_FACTOR = 3.0
"""|small - masked| <= |small - exact| + |exact - masked|: the measured noise of the small model,
plus up to twice that for the masked one."""


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` with example inputs as the trace called it: a tuple is positional, a dict keyword,
    anything else one arg, and ``use_cache=False`` where the model takes it (a cache is not the
    function being compared, and hybrid models' caches can fail where the trace did not)."""
    if isinstance(inputs, (dict, tuple, list, torch.Tensor)):
        args, kwargs = normalize_inputs(model, inputs)
        return model(*args, **kwargs)
    return model(inputs)


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    """Every floating/integer tensor in a (nested) output: tensors, tuples, lists, dicts, ModelOutputs."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):  # transformers ModelOutput is an OrderedDict
        return [t for v in obj.values() for t in flatten_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in flatten_tensors(v)]
    return []


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype verification computes in for a model of ``dtype``: fp32 for 16-bit models, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(atol, rtol)`` for comparing outputs computed in ``dtype``: max|a-b| <= atol + rtol * max|ref|.

    16-bit models are compared in fp32 (:func:`compute_dtype`), so they get fp32's tolerance.
    """
    del dtype  # one policy: every comparison is computed in fp32 or wider
    return 1e-5, 1e-4


def allowed(scale: float, noise: float | None = None, *, atol: float | None = None, rtol: float | None = None) -> float:
    """The largest accepted max |small - masked|: ``atol + rtol * scale + NOISE_FACTOR * noise``.

    ``scale`` is max |masked output|; ``noise`` the measured :func:`rounding_noise` (``None``: not
    measured). ``atol``/``rtol`` default to :func:`tolerance`.

    Example:
        >>> allowed(10.0)
        0.00101
        >>> allowed(10.0, noise=0.01) > allowed(10.0)
        True
    """
    d_atol, d_rtol = tolerance(torch.float32)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    return atol + rtol * scale + NOISE_FACTOR * (noise or 0.0)


def _floating_bytes(module: nn.Module, bits: int) -> int:
    return sum(t.numel() for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()) * bits // 8


def _split(module: nn.Module, bits: int) -> list[nn.Module]:
    """``module``, or (when converting it whole to ``bits`` would take more than
    :data:`UPCAST_BLOCK_BYTES` and it is a plain container: no tensors of its own, not a peft LoRA
    layer, whose adapters read each other's dtype) the :func:`_split` of its children."""
    own = bool(module._parameters or module._buffers)
    if own or hasattr(module, "base_layer") or _floating_bytes(module, bits) <= UPCAST_BLOCK_BYTES:
        return [module]
    return [u for child in module.children() for u in _split(child, bits)]


def _units(model: nn.Module, bits: int = 32) -> list[tuple[nn.Module, bool]]:
    """``(module, whole)`` pairs that :func:`upcast` converts one at a time (to ``bits``): each decoder
    block as a whole (a block larger than :data:`UPCAST_BLOCK_BYTES` once converted: its submodules,
    see :func:`_split`), and every other module with tensors of its own (just those)."""
    try:
        blocks = list(decoder_blocks(model))
    except ShearError:
        blocks = []
    inside = {id(m) for b in blocks for m in b.modules()}
    units: list[tuple[nn.Module, bool]] = [(u, True) for b in blocks for u in _split(b, bits)]
    for m in model.modules():
        if id(m) not in inside and (m._parameters or m._buffers):
            units.append((m, False))
    return units


@contextmanager
def upcast(
    model: nn.Module, dtype: torch.dtype = torch.float32, overrides: Mapping[int, torch.Tensor] | None = None
) -> Iterator[None]:
    """Run ``model`` in ``dtype`` holding one converted unit at a time (a block or, for a large block,
    each of its layers; or a module's own tensors).

    Forward hooks convert the floating parameters and buffers of a unit narrower than ``dtype`` when its forward
    starts and put the originals back when it ends; nothing is copied when the model already is in
    ``dtype``. Inputs are not converted (the embedding's converted weight makes the hidden states
    ``dtype``; pass float inputs in ``dtype`` yourself). ``overrides`` maps ``id(tensor)`` to the
    ``dtype`` value to use in place of that tensor (see :func:`record`). A large ``nn.Linear`` outside
    the blocks (the output head) is never converted whole: its forward runs in blocks of output rows
    (:data:`UPCAST_BLOCK_BYTES`), each converted on its own.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).bfloat16()
        >>> with upcast(net):
        ...     y = net(torch.randn(2, 4))
        >>> y.dtype, net[0].weight.dtype
        (torch.float32, torch.bfloat16)
    """
    overrides = overrides or {}
    bits = torch.finfo(dtype).bits

    def narrower(t: torch.Tensor) -> bool:
        return t.is_floating_point() and torch.finfo(t.dtype).bits < bits

    if not overrides and not any(narrower(t) for t in [*model.parameters(), *model.buffers()]):
        yield
        return
    if isinstance(model, torch.fx.GraphModule):  # one flat graph: no submodule forward to hook
        with _upcast_graph(model, dtype, overrides):
            yield
        return
    handles = []
    saved: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}

    def convert(unit: nn.Module, whole: bool) -> None:
        held = saved.setdefault(id(unit), [])
        for m in unit.modules() if whole else [unit]:
            for kind in ("_parameters", "_buffers"):
                slots = getattr(m, kind)
                for name, t in list(slots.items()):
                    if isinstance(t, torch.Tensor) and (narrower(t) or id(t) in overrides):
                        held.append((m, kind, name, t))
                        new = overrides[id(t)] if id(t) in overrides else t.detach().to(dtype)
                        slots[name] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new

    def restore(unit: nn.Module) -> None:
        for m, kind, name, t in reversed(saved.pop(id(unit), [])):
            getattr(m, kind)[name] = t

    def blockwise(unit: nn.Linear) -> Any:
        rows = max(1, UPCAST_BLOCK_BYTES // max(1, unit.weight.shape[1] * bits // 8))

        def forward(x: torch.Tensor) -> torch.Tensor:
            w, b = unit.weight.detach(), unit.bias
            out = x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dtype)
            for i in range(0, w.shape[0], rows):
                part = None if b is None else b.detach()[i : i + rows].to(dtype)
                out[..., i : i + rows] = nn.functional.linear(x, w[i : i + rows].to(dtype), part)
            return out

        return forward

    patched: list[nn.Module] = []
    for unit, whole in _units(model, bits):
        if type(unit) is nn.Embedding and id(unit.weight) not in overrides:
            # a lookup is exact in any dtype: convert what it returns, not a (vocab-sized) table
            handles.append(unit.register_forward_hook(lambda _u, _a, out: out.to(dtype) if out.is_floating_point() else out))
            continue
        if (
            type(unit) is nn.Linear and not whole and "forward" not in unit.__dict__ and narrower(unit.weight)
            and not any(id(t) in overrides for t in unit.parameters(recurse=False))
            and unit.weight.numel() * bits // 8 > UPCAST_BLOCK_BYTES
        ):
            unit.forward = blockwise(unit)  # type: ignore[method-assign]
            patched.append(unit)
            continue
        handles.append(unit.register_forward_pre_hook(lambda u, _a, w=whole: convert(u, w)))
        handles.append(unit.register_forward_hook(lambda u, _a, _o: restore(u)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for unit in patched:
            del unit.forward
        for key in list(saved):
            for m, kind, name, t in reversed(saved.pop(key)):
                getattr(m, kind)[name] = t


_BITCASTS = (torch.ops.aten.view.dtype,)
"""Graph ops whose dtype argument reinterprets bits rather than converting values: never widened."""
_DTYPE_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)
"""Graph ops that only check a traced dtype: dropped from the widened graph (the dtypes change on purpose)."""


def _widen(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a node argument) with every floating dtype narrower than ``dtype`` replaced by ``dtype``."""
    if isinstance(value, torch.dtype):
        narrow = value.is_floating_point and torch.finfo(value).bits < torch.finfo(dtype).bits
        return dtype if narrow else value
    if isinstance(value, (tuple, list)):
        return type(value)(_widen(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _widen(v, dtype) for k, v in value.items()}
    return value


def widened_graph(gm: torch.fx.GraphModule, dtype: torch.dtype, overrides: Mapping[int, torch.Tensor] | None = None) -> tuple[torch.fx.Graph, dict[str, torch.Tensor]]:
    """A copy of ``gm.graph`` that computes in ``dtype``, and the attributes it reads in place of tensors of
    ``overrides`` (``id(tensor)`` -> value): what :func:`upcast` runs for a ``GraphModule``.

    A traced graph has its dtypes baked in (``x.to(torch.float16)`` after an fp32 norm, a dtype check
    per input), so converting the weights alone would still round to 16 bits where the model did.
    Here every narrower floating weight or constant is converted right before each op that reads it
    (the fp32 copy lives for that op only: a whole fp32 model is never held), every narrower floating
    dtype argument becomes ``dtype`` (bit reinterpretations excepted), and the dtype checks go.

    Example:
        >>> gm = torch.fx.symbolic_trace(lambda x: (x * 2).to(torch.float16))
        >>> graph, _ = widened_graph(gm, torch.float32)
        >>> [n.args[1] for n in graph.nodes if n.op == "call_method" and n.target == "to"]
        [torch.float32]
    """
    overrides = overrides or {}
    bits = torch.finfo(dtype).bits
    graph = copy.deepcopy(gm.graph)
    attrs: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            try:
                t = _attr(gm, str(node.target))
            except AttributeError:
                continue
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) in overrides:
                name = f"_shear_widened_{len(attrs)}"
                attrs[name] = overrides[id(t)]
                node.target = name
            elif t.is_floating_point() and torch.finfo(t.dtype).bits < bits:
                for user in list(node.users):
                    with graph.inserting_before(user):
                        cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
                    user.replace_input_with(node, cast)
        elif node.op in ("call_function", "call_method"):
            if node.target in _DTYPE_ASSERTS and not node.users:
                graph.erase_node(node)
            elif node.target not in _BITCASTS and node.target != "view":
                node.args, node.kwargs = _widen(node.args, dtype), _widen(node.kwargs, dtype)
    graph.lint()
    return graph, attrs


def _attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@contextmanager
def _upcast_graph(gm: torch.fx.GraphModule, dtype: torch.dtype, overrides: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Run ``gm`` on its :func:`widened_graph` for the duration; its own graph is put back after."""
    graph, attrs = widened_graph(gm, dtype, overrides)
    own = gm.graph
    for name, t in attrs.items():
        setattr(gm, name, t)
    gm.graph = graph
    try:
        yield
    finally:
        gm.graph = own
        for name in attrs:
            delattr(gm, name)


@dataclass
class Recording:
    """Outputs of the masked model: the final ones, and per-module ones keyed by (module, call index)."""

    final: list[torch.Tensor]
    modules: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)
    complete: bool = True
    """False when the memory budget cut the per-module recording short."""


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def _hooks(model: nn.Module, fn: Any, pre: Any = None) -> Iterator[None]:
    calls: dict[str, int] = {}
    handles = []

    def make(name: str) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            i = calls.get(name, 0)
            calls[name] = i + 1
            fn(name, i, out)

        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(make(name)))
            if pre is not None:
                handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: pre(n)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(
    model: nn.Module, inputs: Any, *, budget_bytes: int = 256 << 20, overrides: Mapping[int, torch.Tensor] | None = None
) -> Recording:
    """Run the (masked) ``model`` once and keep copies of its outputs for :func:`check`.

    A 16-bit model runs in fp32 (:func:`upcast`), so the recording is free of 16-bit rounding.
    ``overrides`` (``id(tensor)`` -> fp32 value) stand in for tensors that erasing changes on
    purpose: a norm rescaled for a narrower residual width, rounded to 16 bits
    (:meth:`~shear.graph.modules.norms.RmsNormSpec.reference_weight`)."""
    rec = Recording(final=[])
    used = 0

    def keep(name: str, i: int, out: Any) -> None:
        nonlocal used
        ts = flatten_tensors(out)
        size = sum(t.numel() * t.element_size() for t in ts)
        if used + size > budget_bytes:
            rec.complete = False
            return
        used += size
        rec.modules[(name, i)] = [t.detach().clone() for t in ts]  # clone: later in-place ops (ReLU) mutate

    with _eval_no_grad(model), upcast(model, compute_dtype(model_dtype(model)), overrides), _hooks(model, keep):
        out = call_model(model, inputs)
    rec.final = [t.detach().clone() for t in flatten_tensors(out)]
    return rec


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float, bool]:
    """(max |a - b|, max |b|) over pairs of equal shape; and whether any pair was comparable."""
    diff, scale, compared = 0.0, 0.0, False
    for x, y in zip(a, b, strict=False):
        if x.shape != y.shape or not (x.is_floating_point() or x.is_complex()):
            if x.shape == y.shape and not torch.equal(x, y):
                return float("inf"), 0.0, True
            continue
        compared = True
        if x.numel():
            diff = max(diff, float((x.detach().float() - y.detach().to(x.device).float()).abs().max()))
            scale = max(scale, float(y.detach().float().abs().max()))
    return diff, scale, compared


def check(
    model: nn.Module, recording: Recording, inputs: Any, *, atol: float | None = None, rtol: float | None = None
) -> float:
    """Run the small ``model``; return the max |small - masked| over comparable final outputs.

    Raises VerifyError when a final output differs beyond :func:`allowed` (``atol + rtol * max|masked|``
    plus the measured rounding noise), naming the first module (in completion order) whose
    same-shaped output already diverged. A 16-bit model is run in fp32 (:func:`upcast`).
    """
    first: list[tuple[str, float]] = []

    def compare(name: str, i: int, out: Any) -> None:
        if first:
            return
        ref = recording.modules.get((name, i))
        if ref is None:
            return
        diff, scale, compared = _max_diff(flatten_tensors(out), ref)
        if compared and diff > allowed(scale, atol=atol, rtol=rtol):
            first.append((f"{name}" + (f" (call {i})" if i else ""), diff))

    running: list[str] = []

    def enter(name: str) -> None:
        running.append(name)

    def leave(name: str, i: int, out: Any) -> None:
        if running and running[-1] == name:
            running.pop()
        compare(name, i, out)

    with _eval_no_grad(model), upcast(model, compute_dtype(model_dtype(model))), _hooks(model, leave, enter):
        try:
            out = call_model(model, inputs)
        except Exception as e:
            where = running[-1] if running else type(model).__name__
            raise VerifyError(
                f"verify: the small model fails to run in module {where}: {type(e).__name__}: {e}. A module "
                "probably hard-codes a pruned size: teach codegen with "
                "shear.codegen.module_rules.register_module_rule, or mark that space unprunable"
            ) from e
    diff, scale, compared = _max_diff(flatten_tensors(out), recording.final)
    if not compared:
        raise VerifyError(
            "verify: no final output of the small model has the masked model's shape "
            f"({[tuple(t.shape) for t in recording.final]}); verify on a model whose outputs keep their "
            "shape (e.g. with its head) or pass verify=False"
        )
    noise = None
    if diff > allowed(scale, atol=atol, rtol=rtol):
        noise = rounding_noise(model, inputs, flatten_tensors(out))
    if diff > allowed(scale, noise, atol=atol, rtol=rtol):
        d_atol, d_rtol = tolerance(torch.float32)
        atol, rtol = d_atol if atol is None else atol, d_rtol if rtol is None else rtol
        where = f"first diverging module: {first[0][0]} (max diff {first[0][1]:.3g})" if first else (
            "no recorded module output diverged first" + ("" if recording.complete else " (recording was cut by its memory budget)")
        )
        raise VerifyError(
            f"verify: small model differs from the masked original: max |diff| = {diff:.3g} "
            f"(tolerance {atol:.1g} + {rtol:.1g} * {scale:.3g}"
            + (f" + {NOISE_FACTOR:g} * fp rounding noise {noise:.3g}" if noise is not None else "")
            + f"); {where}"
        )
    return diff


def _to_double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_double(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double(v) for v in x)
    return x


def rounding_noise(model: nn.Module, inputs: Any, outputs: list[torch.Tensor]) -> float | None:
    """max |outputs - model in float64| over floating outputs of equal shape: how far ``model``'s own
    evaluation (``outputs``, in its compute dtype) is from exact arithmetic. A model up to
    :data:`NOISE_BUDGET_BYTES` in float64 is copied whole; a larger one is run in float64 one block at
    a time (:func:`upcast`), and a ``GraphModule`` on its :func:`widened_graph`. ``None`` when the
    float64 run fails.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(4, 8)
        >>> 0 < rounding_noise(net, x, [net(x)]) < 1e-5
        True
    """
    size = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 8
    try:
        # a GraphModule's traced dtypes stay what they were in a float64 copy: widen its graph instead
        if size <= NOISE_BUDGET_BYTES and not isinstance(model, torch.fx.GraphModule):
            exact = copy.deepcopy(model).double()
            with _eval_no_grad(exact):
                ref = flatten_tensors(call_model(exact, _to_double(inputs)))
        else:
            with _eval_no_grad(model), upcast(model, torch.float64):
                ref = flatten_tensors(call_model(model, _to_double(inputs)))
    except Exception:  # noqa: BLE001 - no noise floor is the conservative answer
        return None
    diff, _, compared = _max_diff(outputs, ref)
    return diff if compared else None
