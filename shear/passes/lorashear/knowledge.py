"""The ``knowledge-distribution`` pass: LoRAShear's Algorithm 3.

For every node group that owns prunable structures it zeroes ``ratio`` of the structures of each
of its prunable pruning groups (the lowest by ``proxy``), measures the perplexity on the
validation split of ``ctx.data``, and puts the saved slices back bit for bit (checked). The node
groups are then sorted by how far perplexity moved, and the pruning groups of the top ``gamma``
fraction are marked unprunable: LHSPG reads
``ctx.get(KnowledgeDistribution).unprunable_groups`` and leaves them alone.

What "pruning a node group" zeroes:

* a **basic** node group (one channel space): the primary slices (producer rows, bias, lora_B
  rows) of the chosen structures of every prunable pruning group it owns — what LHSPG would leave
  behind; it marks those pruning groups;
* a **composed** node group (a LoRA linear, only in LoRA models): only the output-side slices the
  operator holds (its base rows and lora_B rows) of the chosen structures of the pruning groups it
  produces; it marks those pruning groups. Its input side (columns of the residual or head space)
  belongs to its producer and is measured there.

The metric is the pooled perplexity over the validation sources (geometric mean of the
per-source perplexities of :meth:`shear.data.TextData.perplexity`, which is ``exp`` of the mean
per-source NLL); the deviation is ``ppl_after - ppl_before`` (the base is shared, so sorting by
the relative change ranks the same; both are reported). A non-finite perplexity counts as an
infinite deviation.

``gamma`` defaults to 0.1: the paper gives no value, and its Figure 4 shows the sensitivity
concentrated in the first and last few node groups of LLaMA; protecting the top tenth covers
those while leaving ~90% of the node groups to LHSPG, so a 20-50% target sparsity stays reachable
without over-pruning the rest. The result prints as a Markdown table and is drawn like the paper's
Figure 4 (PNG and SVG) into ``out_dir``, or into ``ctx.options.dump_dir`` when a caller put one
there; without either, no figure is written and the message says so.

Example:
    >>> KnowledgeDistributionAnalysis(ratio=0.5, gamma=0.1).name   # "knowledge-distribution{gamma=0.2}"
    'knowledge-distribution'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from shear.errors import PassError, PipelineError
from shear.figures import plot_deviation
from shear.graph.groups import PruningGroup
from shear.graph.ir import Graph, NodeGroup
from shear.kernels.allocation import structure_count
from shear.kernels.saliency import SaliencyScores, compute_saliency
from shear.model.facts import strip_peft_prefix
from shear.model.tensors import TensorTable
from shear.passes.base import Context, Pass, PassResult, register_analysis, register_pass
from shear.passes.lorashear.knowledge_cache import cache_key, load_result, save_result

__all__ = ["KnowledgeDistributionAnalysis", "KnowledgeDistribution", "NodeGroupDeviation", "pooled_perplexity"]


@dataclass(frozen=True)
class NodeGroupDeviation:
    """What pruning one node group did to perplexity."""

    node_group: int
    name: str
    kind: str
    """``basic`` or ``composed``."""
    pruning_groups: tuple[int, ...]
    """Pruning groups marked unprunable when this node group ranks in the top ``gamma``."""
    structures: int
    """Structures zeroed for the measurement (summed over its pruning groups)."""
    ppl: float
    deviation: float
    """``ppl - base ppl`` (``inf`` when perplexity was not finite)."""
    relative: float
    """``ppl / base ppl - 1``."""
    unprunable: bool = False


@dataclass(frozen=True)
class KnowledgeDistribution:
    """Result of Algorithm 3: per node group deviation, the ranking, and the groups to keep."""

    base_ppl: float
    base_ppl_by_source: dict[str, float]
    entries: tuple[NodeGroupDeviation, ...]
    """One per analysed node group, in network order (the order of their modules in the model)."""
    ranking: tuple[int, ...]
    """Node group ids, largest deviation first."""
    unprunable_node_groups: frozenset[int]
    unprunable_groups: frozenset[int]
    """Pruning group ids that pruning passes (LHSPG) must skip."""
    ratio: float
    gamma: float
    proxy: str
    figures: tuple[Path, ...] = field(default=())

    def __post_init__(self) -> None:
        ids = [e.node_group for e in self.entries]
        if sorted(ids) != sorted(self.ranking) or len(set(ids)) != len(ids):
            raise PassError("KnowledgeDistribution: ranking must order exactly the analysed node groups")
        if not self.unprunable_node_groups <= set(ids):
            raise PassError("KnowledgeDistribution: unprunable node groups must be analysed ones")

    def with_gamma(self, gamma: float) -> KnowledgeDistribution:
        """The same measurement with the top ``gamma`` of the ranking (rounded up) marked unprunable:
        gamma only reads the ranking, so a cached result serves every gamma.

        Example:
            >>> kd.with_gamma(0.2).unprunable_node_groups >= kd.unprunable_node_groups   # doctest: +SKIP
            True
        """
        marked = frozenset(self.ranking[: _marked_count(gamma, len(self.ranking))])
        entries = tuple(replace(e, unprunable=e.node_group in marked) for e in self.entries)
        return replace(
            self,
            entries=entries,
            unprunable_node_groups=marked,
            unprunable_groups=frozenset(g for e in entries if e.unprunable for g in e.pruning_groups),
            gamma=gamma,
        )

    def entry(self, node_group: int) -> NodeGroupDeviation:
        for e in self.entries:
            if e.node_group == node_group:
                return e
        raise PassError(f"KnowledgeDistribution: node group {node_group} was not analysed; analysed: {[e.node_group for e in self.entries]}")

    def table(self) -> str:
        """A Markdown table of the node groups, most sensitive first."""
        lines = [
            f"base perplexity {self.base_ppl:.3f}; ratio {self.ratio}, proxy {self.proxy}, gamma {self.gamma}",
            "",
            "| rank | node group | kind | structures | ppl | Δppl | Δ% | unprunable |",
            "|---:|---|---|---:|---:|---:|---:|:---:|",
        ]
        for rank, ng in enumerate(self.ranking, 1):
            e = self.entry(ng)
            lines.append(
                f"| {rank} | {strip_peft_prefix(e.name)} | {e.kind} | {e.structures} | {e.ppl:.3f} | "
                f"{e.deviation:+.3f} | {100 * e.relative:+.1f} | {'yes' if e.unprunable else ''} |"
            )
        return "\n".join(lines)


def _marked_count(gamma: float, analysed: int) -> int:
    """Node groups the top ``gamma`` fraction of ``analysed`` ones is, rounded up."""
    return min(analysed, math.ceil(gamma * analysed - 1e-9))


def pooled_perplexity(by_source: dict[str, float]) -> float:
    """Geometric mean of per-source perplexities (``exp`` of the mean per-source NLL)."""
    if not by_source:
        return float("nan")
    vals = list(by_source.values())
    if any(not math.isfinite(v) or v <= 0 for v in vals):
        return float("inf")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


@dataclass(frozen=True)
class _Perturbation:
    """The primary slices one node group's measurement zeroes: (tensor, dim, flat indices)."""

    node_group: NodeGroup
    pruning_groups: tuple[int, ...]
    slices: tuple[tuple[torch.Tensor, int, torch.Tensor], ...]
    structures: int


def _network_order(model: nn.Module, graph: Graph) -> dict[int, tuple[float, int]]:
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    out = {}
    for ng in graph.node_groups:
        pos = [position[m] for m in ng.modules if m in position]
        out[ng.id] = (float(min(pos)) if pos else math.inf, ng.id)
    return out


class _Chooser:
    """Which structures of a pruning group a measurement zeroes."""

    def __init__(self, proxy: str, scores: SaliencyScores | None, seed: int) -> None:
        self.proxy, self.scores, self.seed = proxy, scores, seed

    def __call__(self, group: PruningGroup, n: int, node_group: int) -> torch.Tensor:
        if n <= 0:
            return torch.zeros(0, dtype=torch.long)
        if self.proxy == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + node_group * 1009 + group.id)
            return torch.randperm(group.size, generator=gen)[:n].sort().values
        assert self.scores is not None
        if group.id not in self.scores.by_group:
            raise PassError(f"knowledge-distribution: the {self.proxy} scores have no entry for group {group.name}")
        return self.scores.lowest_in(group.id, n)


def _analysed(
    graph: Graph, ratio: float, include: str, kinds: tuple[str, ...]
) -> list[tuple[NodeGroup, list[tuple[PruningGroup, list[Any], int]]]]:
    """The node groups a measurement perturbs, each with (pruning group, primary members it zeroes,
    structures) per owned group; from the graph alone (no scores), so a cached result can be checked."""
    groups = {g.id: g for g in graph.pruning_groups}
    composites = {c.module: c for c in graph.composites}
    out: list[tuple[NodeGroup, list[tuple[PruningGroup, list[Any], int]]]] = []
    for ng in graph.node_groups:
        if include != "all" and ng.kind != include:
            continue
        owned: list[tuple[PruningGroup, list[Any], int]] = []
        for gid in ng.pruning_groups:
            g = groups.get(gid)
            if g is None or not g.prunable or g.kind not in kinds:
                continue
            if ng.kind == "composed":
                comp = composites.get(ng.name)
                prefix = f"{comp.module if comp is not None else ng.name}."
                members = [m for m in g.primary if m.param.startswith(prefix)]
            else:
                members = list(g.primary)
            n = structure_count(g.size, ratio)
            if members and n > 0:
                owned.append((g, members, n))
        if owned:
            out.append((ng, owned))
    return out


def _perturbations(
    graph: Graph, table: TensorTable, ratio: float, choose: _Chooser, include: str, kinds: tuple[str, ...]
) -> list[_Perturbation]:
    out: list[_Perturbation] = []
    for ng, owned in _analysed(graph, ratio, include, kinds):
        slices: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        count = 0
        for g, members, n in owned:
            idx = choose(g, n, ng.id)
            for m in members:
                t = table.get(m.param)
                slices.append((t, m.dim, m.positions[idx].flatten().to(t.device)))
            count += int(idx.numel())
        out.append(_Perturbation(ng, tuple(g.id for g, _, _ in owned), tuple(slices), count))
    return out


def _measure(
    model: nn.Module, p: _Perturbation, evaluate: Any
) -> dict[str, float]:
    """Zero the perturbation's slices, evaluate, restore them bit for bit (checked)."""
    saved = [(t, dim, idx, t.detach().index_select(dim, idx).clone()) for t, dim, idx in p.slices]
    try:
        with torch.no_grad():
            for t, dim, idx, _ in saved:
                t.index_fill_(dim, idx, 0)
        return dict(evaluate(model))
    finally:
        with torch.no_grad():
            for t, dim, idx, values in reversed(saved):
                t.index_copy_(dim, idx, values)
            for t, dim, idx, values in saved:
                now = t.detach().index_select(dim, idx)
                if not torch.equal(now.view(torch.uint8) if now.is_floating_point() else now,
                                   values.view(torch.uint8) if values.is_floating_point() else values):
                    raise PassError(
                        f"knowledge-distribution: weights of node group {p.node_group.name} were not restored "
                        "exactly after the measurement"
                    )


register_analysis("knowledge-distribution", KnowledgeDistribution)


@register_pass
@dataclass(frozen=True)
class KnowledgeDistributionAnalysis(Pass):
    """Measure each node group's perplexity sensitivity to pruning; mark the top gamma unprunable."""

    name: ClassVar[str] = "knowledge-distribution"
    requires: ClassVar[tuple[type, ...]] = (Graph,)
    ensures: ClassVar[tuple[type, ...]] = (KnowledgeDistribution,)

    ratio: float = 0.5
    """Fraction of the structures of each of a node group's pruning groups zeroed for the measurement."""
    gamma: float = 0.1
    """Fraction of the analysed node groups (largest deviation first, rounded up) marked unprunable."""
    proxy: Literal["magnitude", "activation", "random", "saliency"] = "activation"
    """Which structures are zeroed: lowest activation saliency (Wanda-style ``‖W ⊙ ‖X‖‖`` on
    ``calibration`` training windows, the criterion LHSPG prunes by), lowest magnitude, seeded
    random, or lowest ``ctx.get(SaliencyScores)`` (the ``saliency`` pass). Activation by default: on
    SmolLM2-135M (no LoRA) the node groups it marks (MLPs 0, 29, 1) let an MLP cut of 20% of the non-embedding parameters keep
    in-domain / out-of-domain ppl 57.4 / 44.4 before any training, against 67.4 / 54.8 cut uniformly;
    the magnitude proxy measures what pruning the lowest-norm channels does, and on SmolLM2 that
    destroys every layer (ppl ~10^6 for a 20% cut), so it ranks the wrong thing."""
    calibration: int = 8
    """Calibration training windows (``seq_len`` tokens) of the activation proxy."""
    include: Literal["all", "basic", "composed"] = "all"
    """Which node groups to analyse (composed ones exist only in LoRA models)."""
    kinds: tuple[str, ...] = ("channel",)
    """Pruning-group kinds to analyse, as ``lhspg{kinds}`` (both default to MLP channels): marking a
    space LHSPG never prunes (heads and the residual width by default) unprunable would waste a share
    of ``gamma``."""
    seq_len: int = 128
    """Tokens per validation window."""
    max_windows: int | None = 8
    """Validation windows per source and measurement (bounds the cost); None = all."""
    batch_size: int = 4
    """Windows per forward pass."""
    seed: int = 0
    """Seed of the random proxy."""
    out_dir: Path | None = None
    """Where the figure goes (PNG and SVG); default ``ctx.options.dump_dir``, else no figure."""
    cache_dir: str | None = None
    """Keep the result in this directory, keyed by the weights, the text, these options and shear's
    version (:mod:`shear.passes.lorashear.knowledge_cache`); a run with the same key loads it instead of
    measuring again. The result does not depend on the passes after this one, so an ablation of
    ratios, schedules or recovery measures it once; ``gamma`` is not in the key (it only reads the
    ranking), so another gamma re-marks the stored ranking. A stored file is checked field by field and
    against this graph's node groups; one that fails is ignored with a warning and measured again."""

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise PipelineError(f"knowledge-distribution: ratio must be in (0, 1), got {self.ratio}")
        if not 0.0 <= self.gamma <= 1.0:
            raise PipelineError(f"knowledge-distribution: gamma must be in [0, 1], got {self.gamma}")

    def _cache_file(self, model: nn.Module, data: Any) -> Path | None:
        """Where this run's result is kept (``cache_dir``), or None without a cache."""
        if self.cache_dir is None:
            return None
        from shear.training.fingerprint import options_of

        options = options_of(self, skip=("cache_dir", "out_dir", "batch_size", "gamma"))
        return Path(self.cache_dir) / f"knowledge-{cache_key(model, data, options)}.json"

    def _load_cached(self, ctx: Context, cached: Path, graph: Graph) -> KnowledgeDistribution | None:
        """The result stored at ``cached`` re-marked for this gamma, when it is one for this graph (every
        analysed node group with its name, kind and pruning groups; exact schema, finite numbers); else
        ``None`` with a warning naming the file and why, and the pass measures again."""
        if not cached.exists():
            return None
        expected = {
            ng.id: (ng.name, ng.kind, tuple(g.id for g, _, _ in owned))
            for ng, owned in _analysed(graph, self.ratio, self.include, self.kinds)
        }
        try:
            if not cached.is_file():
                raise PassError(
                    f"knowledge-distribution: the cached result {cached} is not a file; the pass ignores it and "
                    "measures again (or remove it)"
                )
            result = load_result(cached, expected)
            if (result.ratio, result.proxy) != (self.ratio, self.proxy):
                raise PassError(
                    f"knowledge-distribution: the cached result {cached} was measured with ratio {result.ratio}, "
                    f"proxy {result.proxy}, not ratio {self.ratio}, proxy {self.proxy}; the pass ignores it and measures again"
                )
            return result.with_gamma(self.gamma)
        except PassError as e:
            ctx.warn(str(e))
            return None

    def _proxy_scores(self, ctx: Context, data: Any, graph: Graph) -> SaliencyScores | None:
        """The scores that choose which structures of a node group the perturbation removes
        (``None`` for ``proxy=random``)."""
        if self.proxy == "magnitude":
            return compute_saliency(ctx.model, graph.pruning_groups, weights="magnitude=1", composites=graph.composites)
        if self.proxy == "activation":
            ids = data.calibration(self.calibration, self.seq_len, seed=self.seed)
            return compute_saliency(
                ctx.model, graph.pruning_groups, weights="activation=1", calibration_ids=ids, composites=graph.composites
            )
        if self.proxy == "saliency":
            scores = ctx.find(SaliencyScores)
            if not isinstance(scores, SaliencyScores):
                raise PipelineError(
                    "knowledge-distribution: proxy=saliency needs the saliency scores; run the saliency pass first"
                )
            return scores
        return None

    def _with_figure(self, result: KnowledgeDistribution, out_dir: Path) -> KnowledgeDistribution:
        """``result`` with the deviation bar chart written under ``out_dir``."""
        entries = result.entries
        finite = [e.deviation for e in entries if math.isfinite(e.deviation)]
        cap = max([abs(d) for d in finite] + [1.0]) * 10
        figures = plot_deviation(
            [strip_peft_prefix(e.name) + (" (lora)" if e.kind == "composed" else "") for e in entries],
            [e.deviation if math.isfinite(e.deviation) else cap for e in entries],
            [e.unprunable for e in entries],
            out_dir / "knowledge-distribution",
            title=f"Perplexity deviation when pruning {self.ratio:.0%} of each node group (base {result.base_ppl:.2f})",
        )
        return KnowledgeDistribution(**{**result.__dict__, "figures": tuple(figures)})

    def run(self, ctx: Context) -> PassResult:
        from shear.data.text import require_text_data

        data = require_text_data(ctx, self.name)
        graph = ctx.get(Graph)
        model = ctx.model
        cached = self._cache_file(model, data)
        result = self._load_cached(ctx, cached, graph) if cached is not None else None
        if result is not None and cached is not None:
            ctx.put(result)
            return PassResult(
                changed=False,
                message=f"loaded from {cached} ({len(result.entries)} node groups, "
                f"{len(result.unprunable_groups)} pruning groups marked unprunable)",
                stats={"node_groups": len(result.entries), "base_ppl": result.base_ppl, "cached": str(cached),
                       "unprunable_node_groups": len(result.unprunable_node_groups),
                       "unprunable_groups": len(result.unprunable_groups), "table": result.table()},
            )
        scores = self._proxy_scores(ctx, data, graph)
        table = TensorTable(model)
        todo = _perturbations(graph, table, self.ratio, _Chooser(self.proxy, scores, self.seed), self.include, self.kinds)
        if not todo:
            raise PassError("knowledge-distribution: no node group owns a prunable structure; nothing to analyse")

        def evaluate(m: nn.Module) -> dict[str, float]:
            return data.perplexity(m, seq_len=self.seq_len, max_windows=self.max_windows, batch_size=self.batch_size)

        base_by_source = evaluate(model)
        base = pooled_perplexity(base_by_source)
        measured: list[tuple[_Perturbation, float]] = []
        with ctx.progress(total=len(todo), description="knowledge-distribution") as bar:
            for p in todo:
                measured.append((p, pooled_perplexity(_measure(model, p, evaluate))))
                bar.advance()

        def dev(ppl: float) -> float:
            return ppl - base if math.isfinite(ppl) else math.inf

        ranking = sorted(measured, key=lambda t: (-dev(t[1]), t[0].node_group.id))
        marked = {p.node_group.id for p, _ in ranking[: _marked_count(self.gamma, len(ranking))]}
        order = _network_order(model, graph)
        entries = tuple(
            NodeGroupDeviation(
                node_group=p.node_group.id,
                name=p.node_group.name,
                kind=p.node_group.kind,
                pruning_groups=p.pruning_groups,
                structures=p.structures,
                ppl=ppl,
                deviation=dev(ppl),
                relative=(ppl / base - 1.0) if math.isfinite(ppl) and base > 0 else math.inf,
                unprunable=p.node_group.id in marked,
            )
            for p, ppl in sorted(measured, key=lambda t: order[t[0].node_group.id])
        )
        unprunable = frozenset(g for e in entries if e.unprunable for g in e.pruning_groups)
        result = KnowledgeDistribution(
            base_ppl=base,
            base_ppl_by_source=dict(base_by_source),
            entries=entries,
            ranking=tuple(p.node_group.id for p, _ in ranking),
            unprunable_node_groups=frozenset(marked),
            unprunable_groups=unprunable,
            ratio=self.ratio,
            gamma=self.gamma,
            proxy=self.proxy,
        )
        out_dir = self.out_dir if self.out_dir is not None else ctx.options.dump_dir
        note = ""
        if out_dir is not None:
            result = self._with_figure(result, Path(out_dir))
        else:
            note = "; no figure (set out_dir or compile(dump_dir=...))"
        ctx.put(result)
        if cached is not None and not (cached.exists() and not cached.is_file()):
            try:
                save_result(cached, result)
            except OSError as e:
                ctx.warn(f"knowledge-distribution: could not keep the result in {cached} ({e}); check cache_dir")
        top = strip_peft_prefix(ranking[0][0].node_group.name)
        return PassResult(
            changed=False,
            message=(
                f"analysed {len(entries)} node groups (base ppl {base:.3f}); most sensitive {top} "
                f"(Δppl {dev(ranking[0][1]):+.3f}); {len(marked)} node groups / {len(unprunable)} pruning groups "
                f"marked unprunable{note}"
            ),
            stats={
                "node_groups": len(entries),
                "base_ppl": base,
                "unprunable_node_groups": len(marked),
                "unprunable_groups": len(unprunable),
                "table": result.table(),
            },
        )
