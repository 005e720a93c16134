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
* a **composed** node group (a LoRA linear, only in LoRA models): the same for the pruning groups
  it produces (whose primary slices it holds: its base rows and lora_B rows); a structure is removed
  whole, so all its primary slices are zeroed; it marks those pruning groups. Its input side
  (columns of the residual or head space) belongs to its producer and is measured there.

Each distinct set of zeroed slices is measured once (:attr:`~shear.kernels.knowledge.Perturbation.key`,
read from the IR): a gated MLP's channel group and its gate/up composites zero the same structures
when the proxy picks them by score, so the three share one measurement and one deviation. The
ranking and gamma still count every analysed node group. Each measurement evaluates every
validation source in one forward per window batch (:func:`~shear.kernels.knowledge.source_perplexities`),
and the decoder blocks before the first one it zeroes replay their unperturbed outputs
(:class:`~shear.kernels.block_replay.BlockReplay`: the same numbers as a full forward, bit for bit).

The metric is the pooled perplexity over the validation sources (geometric mean of the
per-source perplexities on the first ``max_windows`` windows of each, every token scored, as
:meth:`shear.data.TextData.perplexity` scores them: ``exp`` of the mean per-source NLL); the deviation is ``ppl_after - ppl_before`` (the base is shared, so sorting by
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn

from shear.errors import DataError, OutputError, PassError, PipelineError
from shear.figures import plot_deviation
from shear.graph.ir import Graph
from shear.kernels.block_replay import BlockReplay, first_block_of, first_blocks
from shear.kernels.knowledge import (
    Chooser,
    Perturbation,
    analysed_node_groups,
    distinct,
    measure_perturbed,
    network_order,
    perturbations,
    pooled_perplexity,
    source_perplexities,
)
from shear.kernels.saliency import SaliencyScores, compute_saliency
from shear.model.facts import strip_peft_prefix
from shear.model.tensors import TensorTable
from shear.passes.base import Context, Pass, PassResult, register_pass
from shear.passes.lorashear.knowledge_cache import cache_key, load_result, save_result
from shear.passes.lorashear.knowledge_results import KnowledgeDistribution, NodeGroupDeviation, marked_count

__all__ = ["KnowledgeDistributionAnalysis", "KnowledgeDistribution", "NodeGroupDeviation", "pooled_perplexity"]


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
    random, or lowest ``ctx.get(SaliencyScores)`` (the ``saliency`` pass). Activation by default: the
    magnitude proxy measures what pruning the lowest-norm channels does, which on trained LLMs
    destroys every layer and so ranks the wrong thing (docs/results/ablation.md)."""
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
    """Windows of each validation source per forward pass (all sources go in the same forward)."""
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
        options["measures"] = "whole-structures"  # composites zero whole structures (not older files' own rows)
        return Path(self.cache_dir) / f"knowledge-{cache_key(model, data, options)}.json"

    def _load_cached(self, ctx: Context, cached: Path, graph: Graph) -> KnowledgeDistribution | None:
        """The result stored at ``cached`` re-marked for this gamma, when it is one for this graph (every
        analysed node group with its name, kind and pruning groups; exact schema, finite numbers); else
        ``None`` with a warning naming the file and why, and the pass measures again."""
        if not cached.exists():
            return None
        expected = {
            ng.id: (ng.name, ng.kind, tuple(g.id for g, _, _ in owned))
            for ng, owned in analysed_node_groups(graph, self.ratio, self.include, self.kinds)
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
        todo = perturbations(graph, table, self.ratio, Chooser(self.proxy, scores, self.seed), self.include, self.kinds)
        if not todo:
            raise PassError("knowledge-distribution: no node group owns a prunable structure; nothing to analyse")

        if not data.validation:
            raise DataError("knowledge-distribution measures perplexity on TextData.validation, which is empty; "
                            "give held-out text (TextData.from_texts(tokenizer, train, validation))")
        windows = {s: data.eval_windows(s, self.seq_len, self.max_windows) for s in data.validation}

        def evaluate(m: nn.Module) -> dict[str, float]:
            return source_perplexities(m, windows, batch_size=self.batch_size)

        replay = BlockReplay(model)
        with replay.record():
            base_by_source = evaluate(model)
        base = pooled_perplexity(base_by_source)
        unique = distinct(todo)
        starts = first_blocks(model)
        by_key: dict[str, float] = {}
        with ctx.progress(total=len(unique), description="knowledge-distribution") as bar:
            for key, p in unique.items():
                with replay.replay(replay.start_of(first_block_of((t for t, _, _ in p.slices), starts))):
                    by_key[key] = pooled_perplexity(measure_perturbed(model, p, evaluate))
                bar.advance()
        measured: list[tuple[Perturbation, float]] = [(p, by_key[p.measurement]) for p in todo]

        def dev(ppl: float) -> float:
            return ppl - base if math.isfinite(ppl) else math.inf

        ranking = sorted(measured, key=lambda t: (-dev(t[1]), t[0].node_group.id))
        marked = {p.node_group.id for p, _ in ranking[: marked_count(self.gamma, len(ranking))]}
        order = network_order(model, graph)
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
            except (OSError, OutputError) as e:  # atomic_file turns an OSError into an OutputError
                ctx.warn(f"knowledge-distribution: could not keep the result in {cached} ({e}); check cache_dir")
        top = strip_peft_prefix(ranking[0][0].node_group.name)
        return PassResult(
            changed=False,
            message=(
                f"analysed {len(entries)} node groups in {len(unique)} measurements (base ppl {base:.3f}); "
                f"most sensitive {top} "
                f"(Δppl {dev(ranking[0][1]):+.3f}); {len(marked)} node groups / {len(unprunable)} pruning groups "
                f"marked unprunable{note}"
            ),
            stats={
                "node_groups": len(entries),
                "measurements": len(unique),
                "base_ppl": base,
                "unprunable_node_groups": len(marked),
                "unprunable_groups": len(unprunable),
                "table": result.table(),
            },
        )
