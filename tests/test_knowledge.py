"""knowledge-distribution (Algorithm 3): a planted critical node group ranks first; weights come back bit for bit."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from models import VOCAB, build

from shear.data import TextData
from shear.errors import PassError, PipelineError
from shear.passes import Context, PassManager
from shear.passes.lorashear.knowledge import (
    KnowledgeDistribution,
    KnowledgeDistributionAnalysis,
    pooled_perplexity,
)

PLANTED = "model.layers.1.mlp/channel"


def _language(n: int, seed: int) -> torch.Tensor:
    """A noisy deterministic bigram language: next = perm[current] with probability 0.9."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(n, generator=g) < 0.1
    rnd = torch.randint(0, VOCAB, (n,), generator=g)
    ids = torch.empty(n, dtype=torch.long)
    ids[0] = 0
    for i in range(1, n):
        ids[i] = rnd[i] if noise[i] else perm[ids[i - 1]]
    return ids


@pytest.fixture(scope="module")
def planted() -> tuple[torch.nn.Module, TextData]:
    """A tiny LLaMA trained on the bigram language, with a planted critical MLP in layer 1.

    The MLP's channels come in pairs (2i, 2i+1) with equal gate rows, opposite up rows and equal,
    large down columns along one direction: each pair's output cancels exactly, so the model is
    unchanged, but zeroing half of the channels at random breaks pairs and floods the residual
    stream. Pruning that node group must dominate every other one.
    """
    torch.manual_seed(0)
    model, _ = build("llama")
    data = TextData(None, {"bigram": _language(12_000, 0)}, {"bigram": _language(2_048, 1)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(120):
        batch = data.calibration(16, 32, seed=step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    mlp = model.model.layers[1].mlp
    width = mlp.gate_proj.weight.shape[0]
    u = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()
    with torch.no_grad():
        for i in range(0, width, 2):
            mlp.gate_proj.weight[i + 1] = mlp.gate_proj.weight[i]
            mlp.up_proj.weight[i + 1] = -mlp.up_proj.weight[i]
            mlp.down_proj.weight[:, i] = 300 * (1 + i / width) * u
            mlp.down_proj.weight[:, i + 1] = 300 * (1 + i / width) * u
    for p in model.parameters():
        p.requires_grad_(False)
    return model, data


def _run(model: torch.nn.Module, data: TextData | None, spec: str) -> Context:
    ctx = Context(model=model, example_inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long)}, data=data)
    PassManager(["discover-groups", spec]).run(ctx)
    return ctx


def test_planted_node_group_ranks_first_and_weights_are_restored(
    planted: tuple[torch.nn.Module, TextData], tmp_path: Path
) -> None:
    model, data = planted
    base = data.perplexity(model, seq_len=32, max_windows=8)["bigram"]
    assert base < 3.0  # the model learned the language, so perplexity is meaningful
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _run(model, data, f"knowledge-distribution{{proxy=random,kinds=[channel,head],seq_len=32,max_windows=8,out_dir='{tmp_path}'}}")
    kd: KnowledgeDistribution = ctx.results["knowledge-distribution"]
    graph = ctx.results["graph"]
    planted_ng = next(ng for ng in graph.node_groups if ng.name == PLANTED)
    assert kd.ranking[0] == planted_ng.id
    top, second = kd.entry(kd.ranking[0]), kd.entry(kd.ranking[1])
    assert top.deviation > 10 * max(second.deviation, 0.1)
    assert kd.unprunable_node_groups == {planted_ng.id}  # gamma 0.1 of 5 node groups -> 1
    assert kd.unprunable_groups == frozenset(planted_ng.pruning_groups)
    assert kd.base_ppl == pytest.approx(base, rel=1e-6)
    # every weight is back, bit for bit
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # one entry per node group that owns prunable heads or channels (not the residual), in network order
    assert {e.node_group for e in kd.entries} == {
        ng.id for ng in graph.node_groups
        if any(graph.pruning_groups[g].prunable and graph.pruning_groups[g].kind in ("channel", "head")
               for g in ng.pruning_groups)
    }
    names = [e.name for e in kd.entries]
    assert names.index("model.layers.0.mlp/channel") < names.index(PLANTED)
    assert names.index("model.layers.0.self_attn/head") < names.index("model.layers.1.self_attn/head")
    # figure and table
    assert sorted(p.suffix for p in kd.figures) == [".png", ".svg"]
    assert all(p.exists() and p.stat().st_size > 1000 for p in kd.figures)
    table = kd.table()
    assert "| rank | node group |" in table and f"| 1 | {PLANTED} | basic |" in table


def test_gamma_bounds_and_magnitude_proxy(planted: tuple[torch.nn.Module, TextData]) -> None:
    model, data = planted
    none = _run(model, data, "knowledge-distribution{gamma=0,proxy=magnitude,seq_len=32,max_windows=2}")
    kd = none.results["knowledge-distribution"]
    assert kd.unprunable_groups == frozenset() and kd.proxy == "magnitude" and not kd.figures
    every = _run(model, data, "knowledge-distribution{gamma=1,seq_len=32,max_windows=2}")
    kd1 = every.results["knowledge-distribution"]
    assert kd1.unprunable_groups == {  # the default kinds: MLP channels
        g.id for g in every.results["graph"].prunable_groups if g.kind == "channel"
    }
    assert all(math.isfinite(e.ppl) for e in kd1.entries)


def test_lora_composed_node_groups_mark_their_output_side() -> None:
    model, x = build("llama", lora=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    data = TextData(None, {"a": torch.randint(0, VOCAB, (400,), generator=g)}, {"a": torch.randint(0, VOCAB, (64,), generator=g)})
    ctx = _run(model, data, "knowledge-distribution{seq_len=16,max_windows=1,gamma=1,kinds=[channel,head,residual]}")
    kd = ctx.results["knowledge-distribution"]
    graph = ctx.results["graph"]
    groups = {pg.id: pg for pg in graph.pruning_groups}
    composed = [e for e in kd.entries if e.kind == "composed"]
    assert len(composed) == len(graph.composites) == 14
    for e in composed:
        module = e.name.rsplit(".", 1)[-1]
        produced = {groups[i].kind for i in e.pruning_groups}
        # o_proj / down_proj write the residual stream; q/k/v write heads; gate/up the MLP channels
        expected = {"o_proj": {"residual"}, "down_proj": {"residual"}, "q_proj": {"head"}, "k_proj": {"head"},
                     "v_proj": {"head"}, "gate_proj": {"channel"}, "up_proj": {"channel"}}[module]
        assert produced == expected, e.name
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_errors() -> None:
    model, _ = build("llama")
    with pytest.raises(PassError, match="needs text data"):
        _run(model, None, "knowledge-distribution")
    with pytest.raises(PipelineError, match=r"ratio must be in \(0, 1\)"):
        KnowledgeDistributionAnalysis(ratio=0.0)
    with pytest.raises(PipelineError, match=r"gamma must be in \[0, 1\]"):
        KnowledgeDistributionAnalysis(gamma=1.5)
    assert pooled_perplexity({"a": 4.0, "b": 9.0}) == pytest.approx(6.0)
    assert pooled_perplexity({"a": float("inf")}) == math.inf


def test_result_is_independent_of_model_copy(planted: tuple[torch.nn.Module, TextData]) -> None:
    model, data = planted
    a = _run(copy.deepcopy(model), data, "knowledge-distribution{proxy=random,seq_len=32,max_windows=2,seed=3}")
    b = _run(copy.deepcopy(model), data, "knowledge-distribution{proxy=random,seq_len=32,max_windows=2,seed=3}")
    ka, kb = a.results["knowledge-distribution"], b.results["knowledge-distribution"]
    assert ka.ranking == kb.ranking and [e.ppl for e in ka.entries] == [e.ppl for e in kb.entries]


def test_activation_proxy_zeroes_the_lowest_activation_structures(planted: tuple[torch.nn.Module, TextData]) -> None:
    """proxy=activation measures each node group with its lowest Wanda-style structures zeroed (the
    criterion LHSPG prunes by), scored on ``calibration`` training windows; reproduced by hand here."""
    from shear.kernels.saliency import compute_saliency

    model, data = planted
    ctx = _run(copy.deepcopy(model), data, "knowledge-distribution{proxy=activation,ratio=0.5,seq_len=32,max_windows=2,calibration=4}")
    kd = ctx.results["knowledge-distribution"]
    graph = ctx.results["graph"]
    assert kd.proxy == "activation"
    entry = next(e for e in kd.entries if e.name == PLANTED)
    (gid,) = entry.pruning_groups
    group = graph.pruning_groups[gid]
    ids = data.calibration(4, 32, seed=0)
    scores = compute_saliency(model, [group], weights="activation=1", calibration_ids=ids)
    lowest = scores.lowest_in(gid, group.size // 2)
    by_hand = copy.deepcopy(model)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for m in group.primary:
            params[m.param].index_fill_(m.dim, m.positions[lowest].flatten(), 0)
    expected = pooled_perplexity(data.perplexity(by_hand, seq_len=32, max_windows=2))
    assert entry.structures == int(lowest.numel())
    assert entry.ppl == pytest.approx(expected, rel=1e-6)
    # a magnitude-proxy run zeroes other structures in the planted group: the proxy is what chose them
    mag = _run(copy.deepcopy(model), data, "knowledge-distribution{proxy=magnitude,ratio=0.5,seq_len=32,max_windows=2}")
    assert next(e for e in mag.results["knowledge-distribution"].entries if e.name == PLANTED).ppl != entry.ppl


def test_cache_dir_keeps_the_result_and_loads_it_for_the_same_key(
    planted: tuple[torch.nn.Module, TextData], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run with the same weights, text and options loads the stored result without measuring;
    another gamma re-marks the stored ranking without measuring; another option (the proxy's seed) or
    other weights is another key and measures again."""
    import shear.passes.lorashear.knowledge as knowledge

    model, data = planted
    spec = f'knowledge-distribution{{proxy=random,seq_len=32,max_windows=2,cache_dir="{tmp_path}"}}'
    first = _run(model, data, spec).get(KnowledgeDistribution)
    files = sorted(tmp_path.glob("knowledge-*.json"))
    assert len(files) == 1
    measured: list[int] = []
    real = knowledge.measure_perturbed
    monkeypatch.setattr(knowledge, "measure_perturbed", lambda *a, **k: measured.append(1) or real(*a, **k))
    again = _run(model, data, spec).get(KnowledgeDistribution)
    assert again == first and not measured  # loaded, not measured
    regamma = _run(model, data, spec.replace("proxy=random", "proxy=random,gamma=1")).get(KnowledgeDistribution)
    assert not measured and regamma.gamma == 1 and regamma.ranking == first.ranking
    assert regamma.unprunable_node_groups == set(first.ranking)
    assert regamma.unprunable_groups > first.unprunable_groups
    assert regamma == first.with_gamma(1) and regamma.with_gamma(first.gamma) == first
    _run(model, data, spec.replace("proxy=random", "proxy=random,seed=1")).get(KnowledgeDistribution)
    assert measured and len(list(tmp_path.glob("knowledge-*.json"))) == 2
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    measured.clear()
    _run(changed, data, spec)
    assert measured and len(list(tmp_path.glob("knowledge-*.json"))) == 3
    files[0].write_text("{not json")
    measured.clear()
    ctx = _run(model, data, spec)  # a broken file is ignored with a warning and measured again
    assert measured and any(str(files[0]) in w and "not usable" in w for w in ctx.warnings)


def _lora_text() -> tuple[torch.nn.Module, TextData]:
    model, _ = build("llama", lora=True)
    g = torch.Generator().manual_seed(0)
    data = TextData(None, {s: torch.randint(0, VOCAB, (400,), generator=g) for s in ("a", "b")},
                    {s: torch.randint(0, VOCAB, (64,), generator=g) for s in ("a", "b")})  # fmt: skip
    return model, data


def test_node_groups_that_zero_the_same_slices_share_one_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated MLP's channel group and its gate/up LoRA composites zero the same structures (the IR's
    primary slices of the same pruning group, chosen by the same scores): one measurement for the three;
    a random proxy draws per node group, so there each is measured. Zeroing only a composite's own rows
    (what it measured before) gives the same perplexity for a SiLU-gated MLP: checked here, never used."""
    from dataclasses import replace

    import shear.passes.lorashear.knowledge as knowledge
    from shear.kernels.knowledge import Chooser, measure_perturbed, perturbations, source_perplexities
    from shear.kernels.saliency import compute_saliency
    from shear.model.tensors import TensorTable

    model, data = _lora_text()
    measured: list[str] = []
    real = knowledge.measure_perturbed
    monkeypatch.setattr(knowledge, "measure_perturbed", lambda m, p, ev: measured.append(p.node_group.name) or real(m, p, ev))
    ctx = _run(model, data, "knowledge-distribution{proxy=magnitude,seq_len=16,max_windows=2,batch_size=1}")
    kd = ctx.get(KnowledgeDistribution)
    basic = {e.pruning_groups: e for e in kd.entries if e.kind == "basic"}
    composed = [e for e in kd.entries if e.kind == "composed"]
    assert len(basic) == 2 and len(composed) == 4 and len(measured) == 2  # 6 node groups, 2 measurements
    for e in composed:
        assert e.name.endswith(("gate_proj", "up_proj")) and e.ppl == basic[e.pruning_groups].ppl
    # the whole structure and the composite's own rows alone give one perplexity (SiLU(0) * up = 0)
    graph = ctx.results["graph"]
    scores = compute_saliency(model, graph.pruning_groups, weights="magnitude=1", composites=graph.composites)
    todo = perturbations(graph, TensorTable(model), 0.5, Chooser("magnitude", scores, 0), "all", ("channel",))
    gate = next(p for p in todo if p.node_group.name.endswith("layers.0.mlp.gate_proj"))
    mlp = next(p for p in todo if p.node_group.kind == "basic" and p.pruning_groups == gate.pruning_groups)
    assert gate.key == mlp.key and {id(t) for t, _, _ in gate.slices} == {id(t) for t, _, _ in mlp.slices}
    names = {id(t): n for n, t in model.named_parameters()}
    own = replace(gate, slices=tuple(s for s in gate.slices if ".gate_proj." in names[id(s[0])]), key="own")
    assert 0 < len(own.slices) < len(gate.slices)
    windows = {s: data.eval_windows(s, 16, 2) for s in data.validation}

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return source_perplexities(m, windows, batch_size=1)

    assert pooled_perplexity(measure_perturbed(model, own, evaluate)) == pytest.approx(basic[gate.pruning_groups].ppl, rel=1e-6)
    measured.clear()
    _run(model, data, "knowledge-distribution{proxy=random,seq_len=16,max_windows=1}")
    assert len(measured) == 6


def test_every_source_of_a_window_batch_goes_in_one_forward() -> None:
    from shear.kernels.knowledge import source_perplexities

    model, data = _lora_text()
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda m, a, k, out: forwards.append(1), with_kwargs=True)
    try:
        windows = {s: data.eval_windows(s, 16, 3) for s in data.validation}
        together = source_perplexities(model, windows, batch_size=2)
        assert len(forwards) == 2  # windows 0-1 of a and b, then window 2 of both
        alone = data.perplexity(model, seq_len=16, max_windows=3, batch_size=2)
    finally:
        handle.remove()
    assert together.keys() == alone.keys() == {"a", "b"}
    assert all(together[s] == pytest.approx(alone[s], rel=1e-5) for s in alone)


def test_the_command_keeps_the_result_next_to_its_output(tmp_path: Path) -> None:
    """``shear prune`` caches knowledge distribution in shear-kd-cache beside the output (a run at another
    ratio writing beside it finds it); never in the output, which the save replaces, nor in an input."""
    from shear.errors import OutputError
    from shear.passes import resolve_pipeline
    from shear.passes.budgets import lorashear_pipeline
    from shear.passes.lorashear.knowledge_cache import with_cache

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for ratio in (0.2, 0.5):
        passes, note = with_cache(resolve_pipeline(lorashear_pipeline(ratio, "quick")), tmp_path / f"out-{ratio}", None,
                                  (str(model_dir), "corpus"))  # fmt: skip
        (kd,) = [p for p in passes if p.name == "knowledge-distribution"]
        assert kd.cache_dir == str(tmp_path.resolve() / "shear-kd-cache") and kd.cache_dir in note
    chosen, _ = with_cache(resolve_pipeline("knowledge-distribution{cache_dir=/elsewhere}"), tmp_path / "o", None)
    assert chosen[0].cache_dir == "/elsewhere"  # a pipeline's own cache_dir stays
    none, note = with_cache(resolve_pipeline("knowledge-distribution"), tmp_path / "o", "none")
    assert none[0].cache_dir is None and "not cached" in note
    with pytest.raises(OutputError, match="is the output or inside it.*--kd-cache"):
        with_cache(resolve_pipeline("knowledge-distribution"), tmp_path / "o", str(tmp_path / "o" / "kd"))
    with pytest.raises(OutputError, match="is the input or inside it"):
        with_cache(resolve_pipeline("knowledge-distribution"), tmp_path / "o", str(model_dir / "kd"), (str(model_dir),))


def test_blocks_before_the_zeroed_one_are_replayed_with_the_same_numbers(
    planted: tuple[torch.nn.Module, TextData], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A measurement of layer 1 reuses block 0's recorded output (block 0's MLP does not run) and gives
    the perplexities of a full forward, bit for bit; a tied or outside tensor replays nothing."""
    from contextlib import nullcontext

    from shear.kernels.block_replay import BlockReplay, first_block_of, first_blocks

    model, data = planted
    spec = "knowledge-distribution{proxy=random,kinds=[channel,head],seq_len=32,max_windows=3,batch_size=2}"
    ran: list[int] = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.model.layers)]
    try:
        replayed = _run(copy.deepcopy(model), data, spec).get(KnowledgeDistribution)
        with_replay = list(ran)
        monkeypatch.setattr(BlockReplay, "replay", lambda self, start: nullcontext())
        ran.clear()
        full = _run(copy.deepcopy(model), data, spec).get(KnowledgeDistribution)
    finally:
        for h in hooks:
            h.remove()
    assert [e.ppl for e in replayed.entries] == [e.ppl for e in full.entries]  # bit for bit
    assert with_replay.count(0) < ran.count(0) and with_replay.count(1) == ran.count(1)
    starts = first_blocks(model)
    layer1 = model.model.layers[1]
    assert first_block_of([layer1.mlp.up_proj.weight, layer1.self_attn.q_proj.weight], starts) == 1
    assert first_block_of([layer1.mlp.up_proj.weight, model.model.embed_tokens.weight], starts) == 0
    replay = BlockReplay(model, max_bytes=1)  # no boundary fits: nothing is kept, nothing replayed
    with replay.record():
        data.perplexity(model, seq_len=32, max_windows=1)
    assert replay.stride > len(model.model.layers) and replay.outputs == [{}] and replay.start_of(1) == 0
