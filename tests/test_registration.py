"""One registration per op and per module: each facet given once reaches every consumer.

An op's channel rule (the analysis), alias flag (parameter roles) and size rule (GraphModule
codegen) are one entry of ``shear.graph.ops.specs.OP_SPECS``; a module's attribute rule (erasure),
zero-preservation (the analysis) and RMS-norm spec (analysis and rescale) are one entry of
``shear.graph.modules.table.MODULE_SPECS``. The old tables are read-only views of these.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.fx
from torch import nn

import shear
from shear.codegen.graph_module import register_size_rule
from shear.errors import GraphError
from shear.graph.analysis import DimAnalysis
from shear.graph.modules.table import MODULE_SPECS, ModuleSpec, register_module
from shear.graph.ops.specs import (
    OP_SPECS,
    OpSpec,
    alias_ops,
    is_alias_op,
    lookup_rule,
    lookup_size_rule,
    register_op,
)

aten = torch.ops.aten
OP = aten.special_entr  # an op shear has no rule for


@pytest.fixture
def clean_op() -> Iterator[None]:
    assert OP not in OP_SPECS
    yield
    OP_SPECS.pop(OP, None)


def test_one_registration_gives_an_op_all_three_facets(clean_op: None) -> None:
    def channel(a: DimAnalysis, node: torch.fx.Node) -> list[int | None]:
        return a.dims(node.args[0])

    def size(live: object, node: torch.fx.Node) -> None:
        return None

    register_op(OP, channel=channel, alias=True, size=size)
    assert OP_SPECS[OP] == OpSpec(channel=channel, alias=True, size=size)
    # the consumers: the analysis' rule lookup, its alias test, the codegen's size lookup (overloads too)
    assert lookup_rule(OP.default) is channel
    assert is_alias_op(OP.default) and OP in alias_ops()
    assert lookup_size_rule(OP.default) is size


def test_the_channel_rule_reaches_the_trace_and_the_alias_reaches_roles(clean_op: None) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.special.entr(self.up(x).abs() + 1))

    x = torch.randn(3, 4)
    assert not shear.trace(Net(), (x,)).group("up/channel").prunable  # unknown op: pinned
    seen: list[str] = []

    @register_op(OP)  # the decorator without a keyword: the channel rule, as before
    def entr(a: DimAnalysis, node: torch.fx.Node) -> list[int | None]:
        seen.append(node.name)
        return a.dims(node.args[0])

    assert OP_SPECS[OP] == OpSpec(channel=entr)
    shear.trace(Net(), (x,))
    assert seen  # the analysis asked the one table


def test_facets_merge_and_the_old_helpers_write_the_one_table(clean_op: None) -> None:
    @register_op(OP, alias=True)
    def entr(a: DimAnalysis, node: torch.fx.Node) -> list[int | None]:
        return a.dims(node.args[0])

    @register_size_rule(OP)
    def entr_sizes(live: object, node: torch.fx.Node) -> None:
        return None

    assert OP_SPECS[OP] == OpSpec(channel=entr, alias=True, size=entr_sizes)
    register_op(OP.default, alias=False)  # an overload's own facet wins over its packet's
    assert not is_alias_op(OP.default) and lookup_rule(OP.default) is entr
    OP_SPECS.pop(OP.default)


def test_built_in_aliases_and_size_rules_come_from_the_table() -> None:
    assert alias_ops() == {
        aten._to_copy, aten.to, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.detach,
        aten.add, aten.sub, aten.mul, aten.div, aten.neg,
    }  # fmt: skip
    assert OP_SPECS[aten.mean].channel is not None and OP_SPECS[aten.mean].size is not None
    assert lookup_size_rule(aten.view.default) is lookup_size_rule(aten.reshape.default)
    assert lookup_size_rule(aten.relu.default) is None


class _Norm(nn.Module):
    """An RMS norm by another name (no probing: the class name does not say RMSNorm)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.weight, self.eps, self.width = nn.Parameter(torch.ones(d)), 1e-6, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def test_one_registration_gives_a_module_its_facets() -> None:
    from shear.codegen.module_rules import find_rule, update_module_attributes
    from shear.graph.modules.composites import is_zero_preserving_module
    from shear.graph.modules.norms import RmsNormSpec, find_rms_norm

    def attributes(m: nn.Module) -> None:
        m.width = int(m.weight.shape[0])

    spec = RmsNormSpec("eps")
    assert find_rule(_Norm()) is None and find_rms_norm(_Norm()) is None
    try:
        register_module(_Norm, attributes=attributes, rms_norm=spec)
        register_module(_Swish, zero_preserving=True)
        assert MODULE_SPECS[_Norm] == ModuleSpec(attributes=attributes, rms_norm=spec)
        # the consumers: erasure's attribute rules, the analysis' RMS-norm and zero-preserving tests
        norm = _Norm()
        assert find_rule(norm) is attributes and MODULE_SPECS[_Norm].attributes is attributes
        assert find_rms_norm(norm) is spec and MODULE_SPECS[_Norm].rms_norm is spec
        assert is_zero_preserving_module(norm) and is_zero_preserving_module(_Swish())
        norm.weight = nn.Parameter(norm.weight[:3])
        update_module_attributes(norm)
        assert norm.width == 3
    finally:
        MODULE_SPECS.pop(_Norm, None)
        MODULE_SPECS.pop(_Swish, None)
    assert find_rule(_Norm()) is None and not is_zero_preserving_module(_Swish())


def test_the_old_module_helpers_are_thin_wrappers() -> None:
    from shear.codegen.module_rules import (
        STRUCTURAL_RULES,
        find_rule,
        register_module_rule,
        register_structural_rule,
    )
    from shear.graph.modules.composites import ZERO_PRESERVING_MODULES, register_zero_preserving_module
    from shear.graph.modules.norms import find_rms_norm, register_norm_rescale, register_rms_norm

    before = dict(MODULE_SPECS)
    try:

        @register_module_rule(_Norm)
        def attributes(m: nn.Module) -> None:
            return None

        register_rms_norm(_Norm, shear.graph.RmsNormSpec("eps", 1.0))
        assert MODULE_SPECS[_Norm] == ModuleSpec(attributes=attributes, rms_norm=shear.graph.RmsNormSpec("eps", 1.0))

        def is_swish(m: nn.Module) -> bool:
            return isinstance(m, _Swish)

        register_zero_preserving_module(is_swish)
        register_structural_rule(is_swish, attributes)
        assert ZERO_PRESERVING_MODULES[0] is is_swish and STRUCTURAL_RULES[0] == (is_swish, attributes)
        assert MODULE_SPECS[is_swish] == ModuleSpec(attributes=attributes, zero_preserving=True)
        assert find_rule(_Swish()) is attributes
        register_norm_rescale(is_swish, "missing_eps")  # needs the attribute too
        assert find_rms_norm(_Swish()) is None
    finally:
        MODULE_SPECS.clear()
        MODULE_SPECS.update(before)
    with pytest.raises(GraphError, match="a module type or a predicate"):
        register_module("Swish")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["shear.graph.ops.specs", "shear.graph.modules.table", "shear.graph.live_dims",
     "shear.graph.ops.size", "shear.graph.modules.rms_norm_spec"],
)  # fmt: skip
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
