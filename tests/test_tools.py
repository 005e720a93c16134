"""Smoke tests of the tools package (``python -m tools.<name>``): they run, write their table, and resume;
and the architecture coverage check's assertions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tools import arch_coverage, bench_allocation, bench_quality, compat


def test_bench_quality_dense_row_and_table(tmp_path: Path) -> None:
    out = tmp_path / "q.md"
    bench_quality.main(["--quick", "--ratios", "--unstructured", "0", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in rows] == ["dense"]
    assert rows[0]["params"] == 1_049_728
    assert 20 < sum(rows[0]["ppl"].values()) / len(rows[0]["ppl"]) < 80
    assert "| dense | 0.0% | 1,049,728 |" in out.read_text()


def test_bench_quality_resume_keeps_finished_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.md"
    ppl = {s: 50.0 for s in ("kjv", "shakespeare", "wordnet", "jargon", "pydocs")}
    finished = [{"method": "dense", "ratio": 0.0, "params": 1000, "ppl": ppl, "wall_s": 0.0, "peak_mb": 0.0}]
    for method in ("LoRAShear", "LoRAShear (instruct only)", "Taylor + LoRA (LLM-Pruner)", "magnitude + LoRA",
                   "Taylor + dynamic recovery", "magnitude + dynamic recovery"):
        finished.append({"method": method, "ratio": 0.5, "params": 500, "ppl": ppl, "wall_s": 60.0, "peak_mb": 1.0,
                         "recovery_steps": 3, "recovery_tokens": 96})
    out.with_suffix(".json").write_text(json.dumps(finished))
    bench_quality.main(["--quick", "--ratios", "0.5", "--unstructured", "0", "--out", str(out), "--resume"])
    assert "kept from" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text()) == finished
    table = out.read_text()
    assert "| magnitude + LoRA | 50.0% | 500 |" in table
    assert "sum to 6.0 min" in table


def test_bench_quality_table_only_merges_side_by_side_runs(tmp_path: Path) -> None:
    ppl = {s: 40.0 for s in ("kjv", "shakespeare", "wordnet", "jargon", "pydocs")}
    dense = {"method": "dense", "ratio": 0.0, "params": 1000, "ppl": ppl, "wall_s": 0.0, "peak_mb": 0.0}
    structured = {"method": "LoRAShear", "ratio": 0.2, "params": 800, "ppl": ppl, "wall_s": 120.0, "peak_mb": 5.0,
                  "recovery_steps": 90, "recovery_tokens": 92_160}
    unstructured = {"method": "Wanda (unstructured)", "ratio": 0.5, "params": 600, "ppl": ppl, "wall_s": 60.0,
                    "peak_mb": 1.0}
    out = tmp_path / "q.md"
    out.with_suffix(".json").write_text(json.dumps([dense, structured]))
    other = tmp_path / "u.json"
    other.write_text(json.dumps([dense, unstructured]))
    bench_quality.main(["--out", str(out), "--table-only", str(other)])
    assert json.loads(out.with_suffix(".json").read_text()) == [dense, structured, unstructured]
    table = out.read_text()
    assert "smollm2-135m-instruct (full profile)" in table and "merged from 2 runs" in table
    assert "| LoRAShear | 20.0% | 800 |" in table and "| 90 / 92,160 |" in table
    assert "| Wanda (unstructured) | 40.0% | 600 |" in table and "sum to 3.0 min" in table


def test_arch_coverage_table(tmp_path: Path) -> None:
    out = tmp_path / "coverage.md"
    rows = arch_coverage.main(["--archs", "phi3", "falcon", "--no-lora", "--out", str(out)])
    phi3, falcon = rows
    assert phi3["emitted"] == "module tree" and phi3["reload"] == "exact" and phi3["diff"] <= 1e-5
    assert {"head", "residual"} <= set(phi3["kinds"]) and phi3["after"] < phi3["params"]
    assert falcon["kinds"] == ["channel"] and falcon["diff"] <= 1e-5  # its MLP, through x @ w.T
    assert "| phi3 | no | channel, head, residual | 5 |" in out.read_text()


def test_arch_coverage_runs_the_lorashear_pipeline(tmp_path: Path) -> None:
    (row,) = arch_coverage.main(["--archs", "phi3", "--lorashear", "--out", str(tmp_path / "l.md")])
    assert row["class"] == "Phi3ForCausalLM" and row["reload"] == "exact" and row["verify"] <= 1e-5
    assert 0.02 <= row["removed"] <= 0.04 and row["stages"] == "pretrain+instruct"  # target 3%


def test_compat_snapshot_and_compare(tmp_path: Path) -> None:
    """A snapshot records the structure of an architecture; compare tells a pinned-only change from a
    change of what prunes, and a worse suite from an equal one."""
    snap = compat.snapshot(tmp_path / "s.json", ["llama"], suites=False)
    assert "[residual x64] prunable" in snap["structures"]["llama"] and snap["coverage"]["llama+lora"] == "ok"
    text, worse = compat.compare(snap, json.loads((tmp_path / "s.json").read_text()))
    assert not worse and "| llama | same / same | ok | ok |" in text and "verdict: green: " in text

    pinned_only = json.loads(json.dumps(snap))
    pinned_only["structures"]["llama"] = snap["structures"]["llama"].replace("pinned: output", "pinned: layout")
    text, worse = compat.compare(snap, pinned_only)
    assert not worse and "pinned groups changed / same" in text and "-  lm_head/channel" in text

    pruned_less = json.loads(json.dumps(snap))
    pruned_less["structures"]["llama+lora"] = snap["structures"]["llama+lora"].replace("[head x2] prunable", "[head x2] pinned: other")
    pruned_less["suites"] = {"llama": {"passed": 3, "failed": 1, "failures": ["t::x[llama]"]}}
    text, worse = compat.compare(snap, pruned_less)
    assert worse and "same / **prunable groups changed**" in text and "- t::x[llama]" in text


def test_bench_quality_ablation_baseline_row(tmp_path: Path) -> None:
    """The LLM-Pruner-style row: the same count of MLP channels cut from every layer, LoRA trained
    and merged; rows carry out-of-domain perplexities where the Debian texts are installed."""
    out = tmp_path / "a.md"
    bench_quality.main(["--quick", "--ablation", "0.2", "--only", "LLM-Pruner-style (MLP)", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in rows] == ["dense", "LLM-Pruner-style (MLP)"]
    dense, base = rows
    # tiny LLaMA: 4 layers, hidden 128, 787,584 non-embedding parameters; 20% of them = 103 channels a layer
    assert dense["params"] - base["params"] == 4 * 3 * 128 * 103
    assert set(dense["ppl"]) == set(base["ppl"])
    ood = [k for k in dense["ppl"] if k.startswith("ood:")]
    assert len(ood) == sum(Path(folder).is_dir() for folder, _ in bench_quality.OOD_SOURCES.values())
    table = out.read_text()
    assert "out-of-domain ppl" in table and "| LLM-Pruner-style (MLP) | 891,520 | 20.1% |" in table
    assert "| 1.00x / 1.00x |" in table or not ood


def test_bench_quality_tokens_scale_multiplies_every_training_step() -> None:
    """The budget curve's rows: ``--tokens-scale 4`` is four times the steps of every stage, the same
    periods and rounds (so 4 x 61,440 tokens)."""
    p = bench_quality.scaled(bench_quality.ABLATION, 4)
    assert p.lhspg == "warmup=32,periods=4,steps_per_period=32" and (p.rounds, p.steps_per_round) == (2, 20)
    assert bench_quality.scaled(bench_quality.ABLATION, 1) == bench_quality.ABLATION
    with pytest.raises(SystemExit, match="at least 1"):
        bench_quality.scaled(bench_quality.ABLATION, 0)


def test_bench_allocation_removes_the_same_total_in_every_allocation() -> None:
    """Every row of the one-shot allocation table removes the same channels in all; a cap keeps the
    protected layers at 1.5x the others' kept count, whole protection at their full width."""
    import math

    allocation = bench_allocation.allocation
    for protected, cap in (([], math.inf), ([0, 29, 1], math.inf), ([0, 29, 1], 1.5), ([0], 1.5)):
        counts = allocation(30 * 1024, 1536, 30, protected, cap)
        assert sum(counts) == 30 * 1024 and all(0 <= n < 1536 for n in counts)
        if protected and math.isinf(cap):
            assert all(counts[i] == 0 for i in protected)
        elif protected:
            kept_p, kept_o = 1536 - counts[protected[0]], 1536 - counts[2]
            assert kept_p == pytest.approx(1.5 * kept_o, abs=2)
    assert allocation(30 * 410, 1536, 30, [0, 29, 1], 1.5) == allocation(30 * 410, 1536, 30, [0, 29, 1], math.inf)


def test_bench_quality_ablation_row_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    """``--checkpoint-dir``: rows stopped half way (LoRAShear in its third recovery round, the
    baseline after 56 of its 60 steps) pick up from there when the same command runs again, and end
    where the uninterrupted runs ended."""
    rows = ["LLM-Pruner-style (MLP)", "LoRAShear, protect_cap=1.5, LHSPG 4x4, pretrain-only recovery"]
    ck = tmp_path / "ck"
    args = ["--quick", "--ablation", "0.2", "--only", *rows, "--checkpoint-dir", str(ck)]
    bench_quality.main(args + ["--out", str(tmp_path / "a.md")])
    first = json.loads((tmp_path / "a.json").read_text())[1:]
    assert [r["method"] for r in first] == rows and not any("resumed" in r for r in first)
    baseline, lhspg, recover = sorted(ck.iterdir())
    assert baseline.name.startswith("baseline-") and lhspg.name.startswith("lhspg-")
    rounds = sorted(recover.iterdir())
    assert [r.name for r in rounds] == ["pretrain-01", "pretrain-02", "pretrain-03", "pretrain-04"]

    def drop_latest(folder: Path) -> None:
        shutil.rmtree(max(folder.iterdir(), key=lambda d: int(d.name.split("-")[1])))

    shutil.rmtree(rounds[-1])  # as if stopped in round 3, at its step-8 checkpoint
    drop_latest(rounds[2])
    drop_latest(baseline)
    bench_quality.main(args + ["--out", str(tmp_path / "b.md")])
    again = json.loads((tmp_path / "b.json").read_text())[1:]
    assert again[0]["resumed"] == [w for w in again[0]["resumed"] if "resumed from step 56 of 60" in w] != []
    assert any("resumed from step 8 of 11" in w for w in again[1]["resumed"])
    assert any("had already finished" in w for w in again[1]["resumed"])
    for a, b in zip(first, again):
        assert a["ppl"] == b["ppl"] and a["params"] == b["params"]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", list(arch_coverage.ARCHITECTURES))
def test_arch_coverage_every_architecture_erases_exactly(arch: str, lora: bool) -> None:
    """``tools.arch_coverage``'s table as assertions: every architecture traces; where something is
    prunable, pruning 40% at random and erasing gives the masked model's logits (1e-5), fewer
    parameters, and ``shear.save`` / ``shear.load`` give them back exactly; where nothing is, the
    analysis says why."""
    row = arch_coverage.check(arch, lora=lora)
    if not row["kinds"]:
        assert row["why"], f"{arch}: nothing prunable and no reason given"
        return
    assert row["groups"] > 0 and row["after"] < row["params"]
    assert row["diff"] <= 1e-5, f"{arch}: erased logits differ from the masked model's by {row['diff']:.2e}"
    assert row["reload"] == "exact"
