"""Front end: ``torch.export`` a model (weights may live on the meta device) and run the analysis.

``trace(model, example_inputs)`` exports with ``strict=False`` (nodes carry ``nn_module_stack``, so
every aten op maps to its module and parameters), runs every op's channel rule once in
topological order, and hands the result to discovery (:mod:`shear.graph.discovery`).

Example:
    >>> import torch, shear
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> g = shear.trace(net, torch.randn(3, 4))
    >>> [(p.name, p.size) for p in g.prunable_groups]
    [('0/channel', 8)]
"""

from __future__ import annotations

import inspect
import time
import traceback
from typing import Any

import torch
import torch.fx
from torch import nn

import shear.graph.ops.compute  # noqa: F401  (registers rules)
import shear.graph.ops.layout  # noqa: F401  (registers rules)
import shear.graph.ops.size  # noqa: F401  (registers the size facets)
from shear.errors import GraphError, TraceError
from shear.graph.analysis import DimAnalysis, StateRef
from shear.graph.ir import Graph
from shear.graph.modules.composites import is_zero_preserving_module
from shear.graph.ops.registry import lookup_rule, unknown_rule

__all__ = ["trace", "export_model", "normalize_inputs", "run_analysis", "dynamic_shapes_for"]


def normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Turn a tensor / tuple / dict into (args, kwargs); add ``use_cache=False`` where accepted."""
    if example_inputs is None:
        raise TraceError(
            f"trace({type(model).__name__}) needs example_inputs: a tensor, a tuple of positional "
            "arguments, or a dict of keyword arguments (e.g. {'input_ids': ids} for a transformers model)"
        )
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif hasattr(example_inputs, "keys"):  # transformers BatchEncoding
        args, kwargs = (), {k: example_inputs[k] for k in example_inputs.keys()}
    else:
        raise TraceError(f"example_inputs must be a tensor, tuple or dict, got {type(example_inputs).__name__}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if ("use_cache" in params or (accepts_kwargs and hasattr(model, "config"))) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def _on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, device="meta") if not x.is_meta else x
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_meta(v) for v in x)
    return x


def _failing_module(model: nn.Module, exc: BaseException) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if isinstance(obj, nn.Module) and id(obj) in names:
            found = f"{names[id(obj)] or '<root>'} ({type(obj).__name__})"
    return found


def dynamic_shapes_for(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` for :func:`torch.export.export` that lets every dimension of every tensor
    input vary (``Dim.AUTO``: export keeps a dimension static only where the model needs it)."""
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: auto for i in range(x.dim())}
        if isinstance(x, (tuple, list)):
            return type(x)(spec(v) for v in x)
        if isinstance(x, dict):
            return {k: spec(v) for k, v in x.items()}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: spec(value) for name, value in bound.arguments.items()}


def export_model(model: nn.Module, example_inputs: Any, *, dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export(strict=False)`` with errors turned into :class:`TraceError`; with
    ``dynamic``, input dimensions may vary (see :func:`dynamic_shapes_for`)."""
    args, kwargs = normalize_inputs(model, example_inputs)
    if _on_meta(model):
        args, kwargs = _to_meta(args), _to_meta(kwargs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            shapes = dynamic_shapes_for(model, args, kwargs) if dynamic else None
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - any export failure becomes an actionable TraceError
        where = _failing_module(model, e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"could not trace {type(model).__name__}: {type(e).__name__}: {first}"
            + (f"\n  failing module: {where}" if where else "")
            + "\n  try: check that example_inputs match forward() (shapes, dtypes, keyword names); "
            "remove data-dependent Python control flow from that module, or wrap it in a module whose "
            "op you register with @shear.graph.register_op"
        ) from e
    finally:
        model.train(was_training)


def run_analysis(ep: torch.export.ExportedProgram, model: nn.Module) -> DimAnalysis:
    """Run every node's channel rule once, in topological order."""
    sig = ep.graph_signature
    to_param = dict(sig.inputs_to_parameters)
    to_buffer = dict(sig.inputs_to_buffers)
    user_inputs = set(sig.user_inputs)
    a = DimAnalysis()
    canonical = _canonical_names(model)
    modules = dict(model.named_modules())
    zero_modules = {n for n, m in modules.items() if is_zero_preserving_module(m)}
    for node in ep.graph.nodes:
        a.current = node
        stack = node.meta.get("nn_module_stack") or {}
        a.zero_scope = next((str(p) for p, _ in stack.values() if str(p) in zero_modules), None)
        if node.op == "placeholder":
            shape = a.shape(node)
            name = to_param.get(node.name) or to_buffer.get(node.name)
            if name is not None:
                name = canonical.get(name, name)
                ref = StateRef(name, node.name in to_buffer, shape)
                a.state[node] = ref
                dims = a.fresh(shape, name)
                for i, sp in enumerate(dims):
                    if sp is not None:
                        prev = a.state_dims.get((name, i))
                        a.state_dims[(name, i)] = sp if prev is None else a.spaces.union(prev, sp)
                a.values[node] = dims
            elif node.name in user_inputs:
                a.values[node] = a.fresh(shape, f"input:{node.name}", "model input")
            else:
                a.values[node] = a.fresh(shape, f"const:{node.name}", "constant tensor")
        elif node.op == "call_function":
            rule = lookup_rule(node.target) or unknown_rule
            try:
                a.values[node] = rule(a, node)
            except GraphError:
                raise
            except Exception as e:  # noqa: BLE001 - a rule bug must not guess: pin and report
                a.diagnose("rule-error", f"rule for {node.target} failed ({type(e).__name__}: {e}); pinned")
                a.values[node] = unknown_rule(a, node)
            a.alias_state(node)
            out = a.values[node]
            spaces: set[int] = set()
            for d in out if out and isinstance(out[0], list) else [out]:
                spaces.update(sp for sp in d if sp is not None)
            a.node_spaces[node] = spaces
        elif node.op == "output":
            for arg in node.all_input_nodes:
                v = a.values.get(arg) or []
                for d in v if v and isinstance(v[0], list) else [v]:
                    a.pin_all(d, "model output")
    a.current = None
    return a


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Tied tensors (one Parameter under several names) map to their first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for getter in (model.named_parameters, model.named_buffers):
        for name, t in getter(remove_duplicate=False):
            out[name] = first.setdefault(id(t), name)
    return out


def trace(model: nn.Module, example_inputs: Any = None) -> Graph:
    """Trace ``model`` into the shear IR: node groups, LoRA composites, overlaps, pruning groups.

    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments.
    The model may live on the meta device (no weights); inputs are moved there too.
    """
    from shear.graph.discovery import discover

    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs an nn.Module, got {type(model).__name__}")
    t0 = time.perf_counter()
    ep = export_model(model, example_inputs)
    t1 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny index ops: thread hand-offs cost more than they save
    try:
        analysis = run_analysis(ep, model)
        graph = discover(model, ep, analysis)
    finally:
        torch.set_num_threads(threads)
    graph.trace_seconds = t1 - t0
    graph.group_seconds = time.perf_counter() - t1
    return graph
