"""The IR: tracing, channel spaces, op registry, node groups, LoRA composites and pruning groups.

Example:
    >>> import torch, shear.graph as sg
    >>> g = sg.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...              torch.randn(1, 4))
    >>> g.prunable_groups[0].size
    8
"""

from shear.graph.analysis import Diagnostic, DimAnalysis
from shear.graph.draw import draw, to_dot
from shear.graph.groups import Member, NormRescale, PruningGroup, Role, Slice
from shear.graph.ir import Graph, IRNode, LoraComposite, NodeGroup, Overlap
from shear.graph.modules.composites import register_zero_preserving_module
from shear.graph.modules.norms import RmsNormSpec, find_rms_norm, register_norm_rescale, register_rms_norm
from shear.graph.modules.table import ModuleSpec, register_module
from shear.graph.ops.registry import register_op
from shear.graph.ops.specs import OpSpec
from shear.graph.trace import trace

__all__ = [
    "Diagnostic",
    "DimAnalysis",
    "Graph",
    "IRNode",
    "LoraComposite",
    "Member",
    "NodeGroup",
    "NormRescale",
    "Overlap",
    "PruningGroup",
    "Role",
    "Slice",
    "register_norm_rescale",
    "register_rms_norm",
    "find_rms_norm",
    "RmsNormSpec",
    "register_op",
    "OpSpec",
    "register_module",
    "ModuleSpec",
    "trace",
    "draw",
    "to_dot",
    "register_zero_preserving_module",
]
