"""Budgets in tokens and time: the named budgets, what ``auto`` sizes on a GPU and refuses on a CPU, and
the tokens and estimate ``shear prune`` prints before training."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import shear.scale.budget as budget_mod
from shear.errors import TrainingError
from shear.passes.budgets import BUDGETS, MIN_GPU_TOKENS, Budget, auto_budget, lorashear_pipeline
from shear.scale.budget import STEP_FORWARDS, plan_budget


@pytest.fixture(scope="module")
def llama7b() -> torch.nn.Module:
    """LLaMA-7B's shapes (LlamaConfig's defaults: 32 layers, hidden 4096) on the meta device: no weights."""
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig())


def test_named_budgets_are_tokens_and_their_steps_follow() -> None:
    for b in BUDGETS.values():
        assert b.lhspg_steps * b.row_tokens >= b.lhspg_tokens > (b.lhspg_steps - b.periods) * b.row_tokens
        assert b.recover_steps * b.row_tokens >= b.recover_tokens
    default = BUDGETS["default"]
    assert (default.lhspg_steps, default.recover_steps, default.training_tokens) == (12, 48, 30_720)
    assert lorashear_pipeline(0.2, "default") == (
        "lora{r=8},discover-groups,knowledge-distribution{max_windows=1,seq_len=128},"
        "lhspg{ratio=0.2,periods=4,steps_per_period=3,warmup=0,batch_size=4,seq_len=128},erase,"
        "recover-dynamic{max_rounds=4,steps_per_round=12,batch_size=4,seq_len=128,eval_windows=2},merge-lora"
    )
    with pytest.raises(Exception, match="lhspg_tokens must be an int >= 1"):
        Budget("bad", lhspg_tokens=0, recover_tokens=1, knowledge_tokens=1, batch_size=1, seq_len=1, periods=1,
               rounds=1, eval_windows=1)  # fmt: skip


@pytest.mark.parametrize("params", [1_000_000_000, 7_000_000_000, 8_000_000_000])
def test_auto_on_a_gpu_sizes_a_real_run(params: int) -> None:
    b = auto_budget(params, "cuda")
    assert b is not None and b.training_tokens >= MIN_GPU_TOKENS and b.seq_len == 512
    assert 0.2 < b.lhspg_steps / (b.lhspg_steps + b.recover_steps) < 0.3  # about a quarter in LHSPG
    smaller = auto_budget(params // 2, "cuda")
    assert smaller is not None and MIN_GPU_TOKENS <= smaller.training_tokens < b.training_tokens


def test_auto_on_a_cpu_refuses_a_7b_model_with_the_estimate(llama7b: torch.nn.Module) -> None:
    with pytest.raises(TrainingError, match=r"--budget auto: a 6\.7B-parameter model .* would take about .* "
                       r"--budget default \(30,720 tokens\) about .*name a budget .*--budget quick\|default\|paper"):
        plan_budget(llama7b, "auto", "cpu")
    rate = 50.0  # a named budget runs: the estimate is printed, not refused
    plan = plan_budget(llama7b, "quick", "cpu", rate=rate)
    assert plan.budget.name == "quick" and plan.seconds > 0


def test_auto_on_cuda_sizes_at_least_a_million_tokens_and_prints_them(
    llama7b: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``shear prune``'s budget step on a GPU (the device's matmul rate stubbed: no GPU here): tokens per stage,
    the estimate, the pipeline, and where knowledge distribution is cached."""
    from shear.cli import _budget_pipeline
    from shear.data import TextData

    monkeypatch.setattr(budget_mod, "matmul_rate", lambda device, dtype=torch.float32: 400e12)
    data = TextData(None, {"a": torch.arange(100)}, {"a": torch.arange(50), "b": torch.arange(50)})
    args = argparse.Namespace(ratio=0.2, budget="auto", device="cuda", output=str(tmp_path / "out"), kd_cache=None,
                              model=str(tmp_path / "model"), data="corpus")  # fmt: skip
    passes = _budget_pipeline(llama7b, data, args)
    err = capsys.readouterr().err
    plan = plan_budget(llama7b, "auto", "cuda", sources=2, rate=budget_mod.MATMUL_EFFICIENCY * 400e12 / (2 * 6_738_415_616))
    b = plan.budget
    assert b.training_tokens >= 1_000_000 and plan.params == 6_738_415_616
    assert f"LHSPG {b.lhspg_steps * b.row_tokens:,} tokens ({b.lhspg_steps} steps of 8 x 512)" in err
    assert f"recovery up to {b.recover_steps * b.row_tokens:,} tokens ({b.rounds} rounds x {b.steps_per_round} steps)" in err
    assert "estimated time on cuda: " in err and "a timed matmul (400,000 GFLOP/s) on cuda" in err
    assert f"knowledge distribution: cached in {tmp_path.resolve() / 'shear-kd-cache'}" in err
    assert [p.name for p in passes][:3] == ["lora", "discover-groups", "knowledge-distribution"]


def test_the_estimate_is_the_stages_work_at_the_measured_rate() -> None:
    from shear.zoo import load_tiny_llama

    model = load_tiny_llama().model
    plan = plan_budget(model, "default", "cpu", sources=5, rate=1000.0)
    b = BUDGETS["default"]
    layers = model.config.num_hidden_layers
    kd = (layers + 1) * 5 * 128 + 8 * 128
    evaluation = (4 + 2) * 5 * 2 * 128
    assert plan.knowledge_tokens == kd and plan.evaluation_tokens == evaluation
    assert plan.seconds == pytest.approx((STEP_FORWARDS * b.training_tokens + kd + evaluation) / 1000.0)
    assert sum(plan.stage_seconds().values()) == pytest.approx(plan.seconds)
    measured = plan_budget(model, "quick", "cpu")  # the model's own forward, timed
    assert measured.rate > 0 and "one timed forward of 1 x 64 tokens" in measured.how
    assert "estimated time on cpu" in measured.format()
