"""Fuzz: random architectures -> trace -> random pruning -> erase; the small model equals the masked one.

Each case is a seed. ``fuzz_net(seed)`` builds a random stack of linear/conv layers, residual adds,
concats, splits, strided reads of a fused projection, RMS/Layer/BatchNorms and multi-head attention
with random head / kv-head counts and head sizes. The default profile runs ``CI_CASES`` seeds; ``--slow`` runs ``SLOW_CASES`` more.
Seeds that once failed stay in ``REGRESSIONS``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shear.codegen.module_tree import codegen
from shear.graph import trace
from shear.io.checkpoint import load, save
from shear.passes.baselines.random import zero_random

CI_CASES = 200
SLOW_CASES = 3000
REGRESSIONS: list[int] = []
"""Seeds of counterexamples found so far (kept as regression tests)."""

_ACTS = [torch.relu, torch.tanh, F.gelu, F.silu]


class Attention(nn.Module):
    """Multi-head attention with ``n_kv`` kv heads, each shared by ``q_per_kv`` query heads (GQA)."""

    def __init__(self, d: int, n_kv: int, q_per_kv: int, head_dim: int, bias: bool) -> None:
        super().__init__()
        self.head_dim, self.q_per_kv = head_dim, q_per_kv
        self.q = nn.Linear(d, n_kv * q_per_kv * head_dim, bias=bias)
        self.k = nn.Linear(d, n_kv * head_dim, bias=bias)
        self.v = nn.Linear(d, n_kv * head_dim, bias=bias)
        self.o = nn.Linear(n_kv * q_per_kv * head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        n_kv = k.shape[1]
        k = k[:, :, None].expand(b, n_kv, self.q_per_kv, s, self.head_dim).reshape(b, -1, s, self.head_dim)
        v = v[:, :, None].expand(b, n_kv, self.q_per_kv, s, self.head_dim).reshape(b, -1, s, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class SeqBlock(nn.Module):
    def __init__(self, kind: str, d: int, rng: random.Random) -> None:
        super().__init__()
        self.kind = kind
        self.act = rng.choice(_ACTS)
        self.norm = nn.RMSNorm(d, eps=1e-5) if rng.random() < 0.7 else nn.LayerNorm(d)
        bias = rng.random() < 0.5
        if kind == "mlp":
            h = rng.randint(3, 24)
            self.up = nn.Linear(d, h, bias=bias)
            self.gate = nn.Linear(d, h, bias=bias) if rng.random() < 0.5 else None
            self.down = nn.Linear(h, d, bias=bias)
        elif kind == "attn":
            self.attn = Attention(d, rng.randint(1, 3), rng.randint(1, 3), rng.choice([2, 4, 6, 8]), bias)
        elif kind == "split":
            m1, m2 = rng.randint(2, 10), rng.randint(2, 10)
            self.inp_a, self.inp_b = nn.Linear(d, m1, bias=bias), nn.Linear(d, m2, bias=bias)
            self.out = nn.Linear(m1 + m2, d, bias=bias)
        elif kind == "interleaved":  # one fused projection read back in strides (GPT-OSS's GLU layout)
            self.stride = rng.choice([2, 3])
            self.fused = nn.Linear(d, self.stride * rng.randint(2, 8), bias=bias)
            self.out = nn.Linear(self.fused.out_features // self.stride, d, bias=bias)
        elif kind == "branches":
            self.a = nn.Linear(d, rng.randint(2, 10), bias=bias)
            self.b = nn.Linear(d, rng.randint(2, 10), bias=bias)
            self.out = nn.Linear(self.a.out_features + self.b.out_features, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.kind == "mlp":
            u = self.up(h)
            u = self.act(self.gate(h)) * u if self.gate is not None else self.act(u)
            return x + self.down(u)
        if self.kind == "attn":
            return x + self.attn(h)
        if self.kind == "split":
            # a concat, then a split whose sizes are read from the modules (so they follow erasure)
            sizes = [self.inp_a.out_features, self.inp_b.out_features]
            a, b = torch.cat([self.inp_a(h), self.inp_b(h)], dim=-1).split(sizes, dim=-1)
            return x + self.out(torch.cat([self.act(a), b * 0.5], dim=-1))
        if self.kind == "interleaved":
            f = self.fused(h)
            parts = [f[..., r :: self.stride] for r in range(self.stride)]
            return x + self.out(self.act(parts[0]) * math.prod(parts[1:]))
        return x + self.out(torch.cat([torch.relu(self.a(h)), torch.tanh(self.b(h))], dim=-1))


class SeqNet(nn.Module):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        d_in, d = rng.randint(3, 12), rng.choice([8, 12, 16, 24])
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            SeqBlock(rng.choice(["mlp", "attn", "split", "branches", "interleaved"]), d, rng) for _ in range(rng.randint(1, 4))
        )
        self.final = nn.RMSNorm(d) if rng.random() < 0.5 else nn.Identity()
        self.head = nn.Linear(d, rng.randint(2, 6))
        self.d_in = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final(x))

    def example(self, seed: int) -> tuple[torch.Tensor]:
        return (torch.randn(2, 5, self.d_in, generator=torch.Generator().manual_seed(seed)),)


class ConvBlock(nn.Module):
    def __init__(self, kind: str, c: int, rng: random.Random) -> None:
        super().__init__()
        self.kind = kind
        c2 = rng.randint(2, 12)
        self.c_out = c if kind in ("res", "dw") else c2
        if kind == "res":
            self.c1, self.b1 = nn.Conv2d(c, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
            self.c2, self.b2 = nn.Conv2d(c2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        elif kind == "dw":
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        elif kind == "shortcut":
            self.c1, self.b1 = nn.Conv2d(c, c2, 3, padding=1), nn.BatchNorm2d(c2)
            self.short = nn.Conv2d(c, c2, 1)
        elif kind == "cat":
            c3 = rng.randint(1, 8)
            self.a = nn.Conv2d(c, c2, 1)
            self.b = nn.Conv2d(c, c3, 3, padding=1)
            self.c_out = c2 + c3
        else:
            self.c1, self.b1 = nn.Conv2d(c, c2, rng.choice([1, 3]), padding="same"), nn.BatchNorm2d(c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "res":
            return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        if self.kind == "dw":
            return torch.relu(self.b1(self.c1(x)))
        if self.kind == "shortcut":
            return torch.relu(self.b1(self.c1(x)) + self.short(x))
        if self.kind == "cat":
            return torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return torch.relu(self.b1(self.c1(x)))


class ConvNet(nn.Module):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        c = rng.randint(2, 8)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        blocks = []
        for _ in range(rng.randint(1, 4)):
            blocks.append(ConvBlock(rng.choice(["plain", "res", "dw", "shortcut", "cat"]), c, rng))
            c = blocks[-1].c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, rng.randint(2, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example(self, seed: int) -> tuple[torch.Tensor]:
        return (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)),)


def fuzz_net(seed: int) -> nn.Module:
    """A random architecture, with random norm parameters and statistics, in eval mode."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    net: Any = SeqNet(rng) if rng.random() < 0.6 else ConvNet(rng)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.RMSNorm, nn.LayerNorm, nn.BatchNorm2d)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
    return net.eval()


def masked_case(seed: int) -> tuple[Any, Any, Any] | None:
    """``(masked model, example inputs, pruning groups)`` of a seed, or None without prunable groups."""
    model = fuzz_net(seed)
    inputs = model.example(seed)
    graph = trace(model, inputs)
    if not graph.prunable_groups:
        return None
    ratio = random.Random(seed + 1).choice([0.1, 0.3, 0.5, 0.7])
    zero_random(model, graph.pruning_groups, ratio, seed)
    return model, inputs, graph.pruning_groups


def check_case(seed: int, tmp_path: Path) -> None:
    case = masked_case(seed)
    if case is None:
        return
    model, inputs, groups = case
    small, report = codegen(model, groups, example_inputs=inputs)
    fresh = model.example(seed + 1000)
    with torch.no_grad():
        want, got = model(*fresh), small(*fresh)
    assert float((want - got).abs().max()) <= 1e-5 * (1 + float(want.abs().max())), f"seed {seed}"
    assert sum(p.numel() for p in small.parameters()) == report.plan.numel()
    save(small, tmp_path / "m")
    again = load(tmp_path / "m", model=fuzz_net(seed))
    with torch.no_grad():
        assert torch.equal(again(*fresh), got)


@pytest.mark.parametrize("seed", REGRESSIONS + list(range(CI_CASES)))
def test_fuzz(seed: int, tmp_path: Path) -> None:
    check_case(seed, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(CI_CASES, CI_CASES + SLOW_CASES))
def test_fuzz_slow(seed: int, tmp_path: Path) -> None:
    check_case(seed, tmp_path)


GRAPH_CI_CASES = 40
GRAPH_SLOW_CASES = 1000


def check_graph_case(seed: int) -> None:
    """The same random architectures through the GraphModule emitter (erase{emit=graph})."""
    case = masked_case(seed)
    if case is None:
        return
    model, inputs, groups = case
    small, report = codegen(model, groups, example_inputs=inputs, emit="graph")
    if report.plan.empty:
        return
    assert isinstance(small, torch.fx.GraphModule) and report.emitted == "graph"
    assert sum(p.numel() for p in small.parameters()) == report.plan.numel()
    fresh = model.example(seed + 1000)
    with torch.no_grad():
        want, got = model(*fresh), small(*fresh)
    assert float((want - got).abs().max()) <= 1e-5 * (1 + float(want.abs().max())), f"seed {seed}"


@pytest.mark.parametrize("seed", range(GRAPH_CI_CASES))
def test_fuzz_graph_emit(seed: int) -> None:
    check_graph_case(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(GRAPH_CI_CASES, GRAPH_CI_CASES + GRAPH_SLOW_CASES))
def test_fuzz_graph_emit_slow(seed: int) -> None:
    check_graph_case(seed)
