"""The shared LoRA training runtime: config, batches, loop, checkpoints and exact resume, LoRA, DDP."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_worker import EditHook, ddp_config, ddp_model, ddp_tokens, pattern_tokens, resume_run
from models import build
from safetensors.torch import load_file

from shear.errors import CheckpointError, DataError, OutputError, TrainingError
from shear.training import (
    InstructionBatches,
    StepLog,
    TokenBatches,
    TrainConfig,
    TrainHook,
    TrainState,
    ensure_lora,
    latest_checkpoint,
    list_checkpoints,
    lora_layers,
    merge_and_reset_lora,
    train,
)

REPO = Path(__file__).resolve().parents[1]
MODULES = ["batches", "config", "distributed", "hooks", "adapters", "peak_memory", "optim", "result", "rng",
           "checkpoints", "loop", "fsdp", "dcp_checkpoints"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _instructions(n: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(2, 8, (1,), generator=g))
        ids = torch.randint(3, 96, (p + r,), generator=g)
        labels = ids.clone()
        labels[:p] = -100
        out.append((ids, labels))
    return out


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(f"shear.training.{module}")
    assert mod.__doc__ and "Example" in mod.__doc__
    failed, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert failed == 0


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0), r"steps must be an int >= 1, got 0"),
        (dict(steps=True), r"steps must be an int"),
        (dict(steps=5, lr=0.0), r"lr must be a finite number > 0"),
        (dict(steps=5, lr=float("nan")), r"lr must be a finite number"),
        (dict(steps=5, weight_decay=-0.1), r"weight_decay must be a finite number >= 0"),
        (dict(steps=5, batch_size=0), r"batch_size must be an int >= 1"),
        (dict(steps=5, grad_accum=0), r"grad_accum"),
        (dict(steps=5, seq_len=1), r"seq_len must be an int >= 2"),
        (dict(steps=5, warmup_steps=6), r"warmup_steps=6 exceeds steps=5"),
        (dict(steps=5, scheduler="step"), r"scheduler must be one of \('constant', 'linear', 'cosine'\)"),
        (dict(steps=5, max_grad_norm=0.0), r"max_grad_norm .* use None to disable"),
        (dict(steps=5, bf16="yes"), r"bf16 must be True, False or None"),
        (dict(steps=5, checkpoint_every=2), r"checkpoint_every=2 needs a checkpoint_dir"),
        (dict(steps=5, log_every=0), r"log_every"),
        (dict(steps=5, gradient_checkpointing="yes"), r"gradient_checkpointing must be True, False or 'auto'"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(TrainingError, match=match):
        TrainConfig(**kwargs)


# --- batches ------------------------------------------------------------------------------------

def test_token_batches_resume_mixture_and_shards() -> None:
    tokens = {"a": torch.zeros(50, dtype=torch.long), "b": torch.ones(30, dtype=torch.long), "c": torch.arange(40)}
    s = TokenBatches(tokens, batch_size=8, seq_len=8, seed=3)
    assert s.weights == pytest.approx({"a": 50 / 120, "b": 30 / 120, "c": 40 / 120})
    next(s)
    s.set_weights({"b": 1.0})
    saved = s.state_dict()
    ahead = [next(s) for _ in range(3)]
    assert all(bool((b["input_ids"] == 1).all()) for b in ahead)
    again = TokenBatches(tokens, batch_size=8, seq_len=8, seed=3)
    again.load_state_dict(saved)  # weights are part of the state
    for b in ahead:
        nb = next(again)
        assert torch.equal(nb["input_ids"], b["input_ids"]) and torch.equal(nb["labels"], b["input_ids"])
    whole = TokenBatches(tokens, batch_size=8, seq_len=8, seed=5)
    shards = [TokenBatches(tokens, batch_size=4, seq_len=8, seed=5).shard(r, 2) for r in range(2)]
    for _ in range(3):
        assert torch.equal(torch.cat([next(x)["input_ids"] for x in shards]), next(whole)["input_ids"])


@pytest.mark.parametrize(
    ("tokens", "kwargs", "match"),
    [
        ({"a": torch.arange(7)}, {}, r"source 'a' has 7 tokens, fewer than seq_len=8"),
        ({}, {}, r"no sources"),
        ({"a": torch.rand(20)}, {}, r"1-D integer tensor"),
        ({"a": torch.arange(20)}, {"weights": {"a": 0.0}}, r"all source weights are 0"),
        ({"a": torch.arange(20)}, {"weights": {"z": 1.0}}, r"unknown sources \['z'\]"),
        ({"a": torch.arange(20)}, {"weights": {"a": -1.0}}, r"negative or not finite"),
    ],
)
def test_token_batches_errors(tokens: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        TokenBatches(tokens, batch_size=2, seq_len=8, **kwargs)


def test_instruction_batches_pad_shuffle_resume_shard() -> None:
    ex = _instructions(7)
    s = InstructionBatches(ex, batch_size=3, pad_id=0, seed=1)
    b = next(s)
    for row in range(3):
        n = int(b["attention_mask"][row].sum())
        assert bool((b["labels"][row, n:] == -100).all()) and bool((b["input_ids"][row, n:] == 0).all())
    seen = [tuple(b["input_ids"][r, : int(b["attention_mask"][r].sum())].tolist()) for r in range(3)]
    for _ in range(2):  # 9 rows: epoch 0 (7 examples) and 2 of epoch 1
        nb = next(s)
        seen += [tuple(nb["input_ids"][r, : int(nb["attention_mask"][r].sum())].tolist()) for r in range(3)]
    assert set(seen[:7]) == {tuple(i.tolist()) for i, _ in ex} and s.epoch == 1
    saved, ahead = s.state_dict(), next(s)
    t = InstructionBatches(ex, batch_size=3, pad_id=0, seed=1)
    t.load_state_dict(saved)
    assert all(torch.equal(ahead[k], v) for k, v in next(t).items())
    whole = InstructionBatches(ex, batch_size=4, pad_id=0)
    shards = [InstructionBatches(ex, batch_size=2, pad_id=0).shard(r, 2) for r in range(2)]
    for _ in range(3):
        w, parts = next(whole), [next(x) for x in shards]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), w[k]) for k in w)


def test_instruction_batches_errors() -> None:
    ids = torch.tensor([5, 6, 7])
    with pytest.raises(DataError, match=r"example 0 has no response tokens .* raise max_length"):
        InstructionBatches([(ids, torch.full((3,), -100))], batch_size=1, pad_id=0)
    with pytest.raises(DataError, match=r"example 0: input_ids \(3,\) and labels \(2,\)"):
        InstructionBatches([(ids, ids[:2])], batch_size=1, pad_id=0)
    with pytest.raises(DataError, match=r"no examples"):
        InstructionBatches([], batch_size=1, pad_id=0)


# --- the loop -----------------------------------------------------------------------------------

def test_loss_decreases_and_only_lora_changes() -> None:
    model, _ = build("llama", lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=40, lr=3e-3, batch_size=4, seq_len=16, log_every=10)
    logs: list[StepLog] = []
    result = train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg, progress=logs.append)
    assert result.steps == 40 and len(result.losses) == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert [log.step for log in logs] == [10, 20, 30, 40]
    assert result.tokens == 40 * 4 * 16 and result.tokens_per_s > 0 and result.peak_memory_bytes > 0
    assert result.memory.method in {"linux_vmhwm", "ru_maxrss"} and result.resumed_from is None
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not model.training  # came in eval, leaves in eval


def test_grad_accumulation_equals_one_big_batch() -> None:
    ex = _instructions(16)  # responses of different lengths: the loss must weigh tokens, not batches
    results = []
    for batch_size, accum in ((2, 2), (4, 1)):
        model, _ = build("llama", lora=True)
        cfg = TrainConfig(steps=3, lr=1e-3, batch_size=batch_size, grad_accum=accum, seq_len=16)
        r = train(model, InstructionBatches(ex, batch_size, pad_id=0), cfg)
        results.append((r.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (la, pa), (lb, pb) = results
    assert la == pytest.approx(lb, abs=1e-6)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-6


def test_gradient_checkpointing_gives_the_same_steps() -> None:
    out = []
    for gc in (False, True):
        model, _ = build("llama", lora=True)
        cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, seq_len=16, gradient_checkpointing=gc)
        out.append(train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg))
        assert not getattr(model.get_base_model(), "is_activation_checkpointing", False)  # switched back off
    assert out[0].losses == pytest.approx(out[1].losses, abs=1e-6)


class _FakeDecoder(torch.nn.Module):
    """Just what :func:`predict_activation_bytes` reads: a config and the weights' dtype."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, **config: int) -> None:
        super().__init__()
        self.config = type("Config", (), config)()
        self.w = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)


def test_auto_checkpointing_decides_from_predicted_and_available_memory(tmp_path: Path) -> None:
    from shear.training.peak_memory import (
        CHECKPOINTING_FRACTION,
        activation_bytes,
        auto_checkpointing,
        available_bytes,
        checkpointing_decision,
        predict_activation_bytes,
    )

    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32)
    seven_b = _FakeDecoder(**shape)
    predicted = predict_activation_bytes(seven_b, 4, 512)
    assert predicted == 4 * 512 * 32 * (38 * 4096 + 10 * 11008)  # the documented formula, 16-bit coefficients
    assert predict_activation_bytes(_FakeDecoder(torch.float32, **shape), 4, 512) == activation_bytes(
        batch=4, seq_len=512, hidden=4096, intermediate=11008, layers=32, dtype_bytes=4)
    assert predict_activation_bytes(seven_b, 8, 512) == 2 * predicted  # linear in tokens
    assert predict_activation_bytes(_FakeDecoder(hidden_size=64), 1, 8) is None  # no layer count: unknown

    gib = 1 << 30
    on, why = auto_checkpointing(seven_b, 4, 512, torch.device("cpu"), available=24 * gib)  # a 24 GB card
    assert on and "exceed 50% of the 24.00 GiB available on cpu" in why
    assert not auto_checkpointing(seven_b, 4, 512, torch.device("cpu"), available=66 * gib)[0]  # an idle 80 GB one
    assert not auto_checkpointing(seven_b, 1, 64, torch.device("cpu"), available=24 * gib)[0]
    assert checkpointing_decision(None, gib) == (False, "activation memory or available memory unknown")
    assert checkpointing_decision(gib, None)[0] is False
    assert checkpointing_decision(int(CHECKPOINTING_FRACTION * gib) + 1, gib)[0]

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   2000000 kB\n")
    assert available_bytes(torch.device("cpu"), meminfo) == 2000000 * 1024
    assert available_bytes(torch.device("meta")) is None


def test_auto_checkpointing_says_when_it_turns_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from shear.training import loop

    model, _ = build("llama", lora=True)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16)
    assert cfg.gradient_checkpointing == "auto"
    calls: list[bool] = []
    real = loop._enable_checkpointing

    def spy(m: torch.nn.Module, w: list[str]):
        calls.append(True)
        return real(m, w)

    monkeypatch.setattr(loop, "_enable_checkpointing", spy)
    quiet = train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg)  # a tiny model: off
    assert not calls and not any("checkpointing" in w for w in quiet.warnings)
    monkeypatch.setattr(loop, "auto_checkpointing", lambda *a, **k: (True, "predicted 9 GiB, exceed 50% of 1 GiB"))
    tight = train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg)
    assert calls == [True]
    assert any(w.startswith("gradient checkpointing is on: predicted 9 GiB") for w in tight.warnings)
    assert not getattr(model.get_base_model(), "is_activation_checkpointing", False)  # switched back off


def test_trainability_checks() -> None:
    plain, _ = build("llama")
    for p in plain.parameters():
        p.requires_grad_(False)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=8)
    batches = TokenBatches.from_config({"a": pattern_tokens()}, cfg)
    with pytest.raises(TrainingError, match=r"nothing to train; add LoRA adapters first: .*ensure_lora"):
        train(plain, batches, cfg)
    model, _ = build("llama", lora=True)
    norm = model.get_base_model().model.norm.weight
    norm.requires_grad_(True)
    before = norm.detach().clone()
    result = train(model, batches, cfg)
    assert any(w.startswith("froze 1 non-LoRA parameters") for w in result.warnings)
    assert not norm.requires_grad and torch.equal(norm, before)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)
    with pytest.raises(TrainingError, match=r"LoRA adapters of .* are all frozen"):
        train(model, batches, cfg)
    model, _ = build("llama", lora=True)
    with pytest.raises(TrainingError, match=r"yields 2 rows per micro-batch but config.batch_size=4"):
        train(model, batches, TrainConfig(steps=1, batch_size=4, seq_len=8))


class _Recorder(TrainHook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_start(self, state: TrainState) -> None:
        self.calls.append(f"start@{state.step}")

    def after_optimizer_step(self, state: TrainState) -> None:
        assert all(p.grad is None for _, p in state.trainable)  # after zero_grad
        self.calls.append(f"step@{state.step}:lr={state.scheduler.get_last_lr()[0]:.2f}")

    def on_train_end(self, state: TrainState) -> None:
        self.calls.append(f"end@{state.step}")


def test_hooks_order_schedule_and_progress_bar() -> None:
    model, _ = build("llama", lora=True)
    cfg = TrainConfig(steps=4, lr=1.0, max_grad_norm=None, warmup_steps=2, scheduler="linear", batch_size=1,
                      seq_len=8, log_every=2)

    class Bar:
        completed, descriptions = 0, []

        def advance(self, n: int = 1) -> None:
            self.completed += n

        def set_description(self, text: str) -> None:
            self.descriptions.append(text)

    rec, bar = _Recorder(), Bar()
    train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg, hooks=[rec], progress=bar)
    assert rec.calls == ["start@0", "step@1:lr=0.50", "step@2:lr=1.00", "step@3:lr=0.50", "step@4:lr=0.00", "end@4"]
    assert bar.completed == 4 and len(bar.descriptions) == 2 and "step 4/4" in bar.descriptions[-1]


# --- checkpoints and exact resume ---------------------------------------------------------------

def test_exact_resume_after_kill(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "_train_worker.py"), "resume", str(ckpt), str(tmp_path / "x"), "5"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed by its hook after step 5
    assert [s for s, _ in list_checkpoints(ckpt)] == [2, 4]  # keeps the last 2
    resumed, r_res, r_hook = resume_run(str(ckpt))
    assert r_res.resumed_step == 4 and r_res.resumed_from == ckpt / "step-4"
    assert [s for s, _ in list_checkpoints(ckpt)] == [6, 8]
    straight, s_res, s_hook = resume_run(None)
    ra, sa = dict(resumed.named_parameters()), dict(straight.named_parameters())
    assert ra.keys() == sa.keys()
    differ = [n for n in ra if not torch.equal(ra[n], sa[n])]
    assert not differ, differ[:5]
    assert r_res.losses == s_res.losses and len(s_res.losses) == 8
    assert r_hook.edits == s_hook.edits == 8 and torch.equal(r_hook.trace, s_hook.trace)
    base = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    fresh, _ = build("llama")
    assert not torch.equal(sa[base], fresh.model.layers[0].self_attn.q_proj.weight)  # the hook edited it
    # A finished run resumes at its last step and trains no more.
    again, a_res, _ = resume_run(str(ckpt))
    assert a_res.resumed_step == 8 and a_res.losses == s_res.losses
    assert all(torch.equal(p, sa[n]) for n, p in again.named_parameters())


def _quick(tmp_path: Path, steps: int = 2, **kw: object) -> tuple[torch.nn.Module, TrainConfig, object]:
    model, _ = build("llama", lora=True)
    cfg = TrainConfig(steps=steps, batch_size=1, seq_len=8, checkpoint_dir=str(tmp_path / "c"),
                      checkpoint_every=1, **kw)  # type: ignore[arg-type]
    return model, cfg, train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg)


def test_a_checkpoint_dir_under_home_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``~`` means the same folder to the writer, the cleaner and the resume lookup: a second run resumes."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    results = []
    for _ in range(2):
        model, _ = build("llama", lora=True)
        cfg = TrainConfig(steps=2, batch_size=1, seq_len=8, checkpoint_dir="~/c", checkpoint_every=1)
        results.append(train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg))
    assert latest_checkpoint("~/c") == tmp_path / "c" / "step-2"
    assert [s for s, _ in list_checkpoints("~/c")] == [1, 2]
    assert results[0].resumed_step == 0 and results[1].resumed_step == 2
    assert not any((tmp_path / "cwd").iterdir())


def test_checkpoint_layout_and_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg, _ = _quick(tmp_path)
    step = latest_checkpoint(tmp_path / "c")
    assert step is not None and step.name == "step-2"
    assert sorted(p.name for p in step.iterdir()) == ["model.safetensors", "state.pt", "trainer.json"]
    saved = load_file(str(step / "model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in saved  # base weights too
    info = json.loads((step / "trainer.json").read_text())
    assert info["step"] == 2 and len(info["losses"]) == 2 and info["config"]["steps"] == 2
    # a write that fails midway leaves no step directory and no temporary behind
    import shear.training.checkpoints as ck

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OutputError, match="disk full.*nothing was written at .*step-1"):
        _quick(tmp_path / "other")
    assert list((tmp_path / "other" / "c").iterdir()) == []
    monkeypatch.undo()
    # a stale temporary from a killed writer is ignored and removed; resuming continues from step-2
    (tmp_path / "c" / ".tmp-step-3-abc").mkdir()
    model2, _ = build("llama", lora=True)
    cfg3 = TrainConfig(steps=3, batch_size=1, seq_len=8, checkpoint_dir=str(tmp_path / "c"), checkpoint_every=1)
    with pytest.raises(CheckpointError, match=r"another config \(steps: checkpoint 2, now 3\)"):
        train(model2, TokenBatches.from_config({"a": pattern_tokens()}, cfg3), cfg3)
    res = train(model2, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg)
    assert res.resumed_step == 2 and not (tmp_path / "c" / ".tmp-step-3-abc").exists()


@pytest.mark.parametrize("damage", ["truncate", "drop_info", "garbage_state"])
def test_corrupt_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    _quick(tmp_path)
    step = tmp_path / "c" / "step-2"
    if damage == "truncate":
        data = (step / "model.safetensors").read_bytes()
        (step / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "drop_info":
        (step / "trainer.json").unlink()
    else:
        size = (step / "state.pt").stat().st_size
        (step / "state.pt").write_bytes(b"x" * size)
    model, _ = build("llama", lora=True)
    cfg = TrainConfig(steps=2, batch_size=1, seq_len=8, checkpoint_dir=str(tmp_path / "c"), checkpoint_every=1)
    with pytest.raises(CheckpointError, match=rf"checkpoint {step} is corrupt or incomplete: .*Delete .*step-1"):
        train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg)
    shutil.rmtree(step)  # the advertised fix works
    assert train(model, TokenBatches.from_config({"a": pattern_tokens()}, cfg), cfg).resumed_step == 1


# --- LoRA -----------------------------------------------------------------------------------------

def test_ensure_lora_message_and_idempotence() -> None:
    model, _ = build("llama")
    wrapped, msg = ensure_lora(model)
    assert msg == "added LoRA adapters (r=8) to 14 linear layers"
    names = [n for n, _ in lora_layers(wrapped)]
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
    assert all(("lora_" in n) == p.requires_grad for n, p in wrapped.named_parameters())
    again, msg2 = ensure_lora(wrapped, r=16)
    assert again is wrapped and msg2 is None
    built, _ = build("llama", lora=True)
    assert ensure_lora(built) == (built, None)


def test_merge_and_reset_lora_keeps_the_function() -> None:
    model, inputs = build("llama", lora=True)  # random B: the adapters change the output
    with torch.no_grad():
        before = model(**inputs).logits
    layers = lora_layers(model)
    a0 = layers[0][1].lora_A["default"].weight.detach().clone()
    assert merge_and_reset_lora(model) == 14
    with torch.no_grad():
        after = model(**inputs).logits
    assert (after - before).abs().max().item() < 1e-5
    for _, layer in layers:
        assert bool((layer.lora_B["default"].weight == 0).all())
    assert not torch.equal(layers[0][1].lora_A["default"].weight, a0)
    plain, _ = build("llama")
    with pytest.raises(TrainingError, match=r"no LoRA adapters to merge; add them with ensure_lora"):
        merge_and_reset_lora(plain)


# --- data parallel --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ddp", pytest.param("ddp-raw", marks=pytest.mark.slow)])
def test_ddp_two_processes_gloo(tmp_path: Path, mode: str) -> None:
    """2 ranks on gloo (accelerate, or plain torch.distributed with --slow) vs one process on 2x the rows."""
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--standalone", str(REPO / "tests" / "_train_worker.py"), mode,
         str(tmp_path)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(tmp_path / "ckpt")] == [2, 4]  # written once, by rank 0
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    losses = [[float(x) for x in (tmp_path / f"losses{r}.txt").read_text().split()] for r in range(2)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # One process on the concatenated batches: the same up to the order of float sums (all-reduce),
    # so close (measured max |diff| 3e-7), not bitwise.
    model = ddp_model()
    cfg = ddp_config(batch_size=4)
    single = train(model, TokenBatches.from_config(ddp_tokens(), cfg), cfg)
    assert single.losses == pytest.approx(losses[0], abs=1e-5)
    mine = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert mine.keys() == ranks[0].keys()
    assert max((mine[k] - ranks[0][k]).abs().max().item() for k in mine) < 1e-5


def test_edit_hook_roundtrips_its_state() -> None:
    hook = EditHook()
    hook.edits, hook.trace = 3, torch.ones(3)
    other = EditHook()
    other.load_state_dict(hook.state_dict())
    assert other.edits == 3 and torch.equal(other.trace, hook.trace)


# --- chunked loss -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "opt"])
def test_chunked_loss_equals_full_logits_loss_and_grads(arch: str) -> None:
    """Loss sum and every gradient (LoRA and a trainable head) match the full-logits loss."""
    from shear.kernels.losses import (
        causal_lm_loss_sum,
        chunked_causal_lm_loss_sum,
        head_bypassed,
        output_head,
    )

    model, _ = build(arch, lora=True)
    head = output_head(model)
    assert head is not None
    head.weight.requires_grad_(True)  # also check the head's own gradient (tied to the embedding or not)
    ids = torch.randint(0, 96, (3, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt, as instruction data masks it
    grads = []
    for chunk in (None, 7, 1000):
        model.zero_grad(set_to_none=True)
        if chunk is None:
            loss = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
        else:
            with head_bypassed(model) as h:
                hidden = model(input_ids=ids).logits
            assert h is head and output_head(model) is head and hidden.shape[-1] != head.weight.shape[0]
            loss = chunked_causal_lm_loss_sum(hidden, h, labels, chunk=chunk)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), *rest = grads
    assert any("lora_" in n for n in g_full) and head.weight.grad is not None
    for value, g in rest:
        assert value == pytest.approx(full, rel=1e-6)
        assert g.keys() == g_full.keys()
        assert max((g[n] - g_full[n]).abs().max().item() for n in g) < 1e-5


def test_chunked_loss_training_matches_full_logits_training() -> None:
    runs = []
    for chunk in (None, 5):
        model, _ = build("llama", lora=True)
        cfg = TrainConfig(steps=3, lr=1e-3, batch_size=2, seq_len=16, loss_chunk_tokens=chunk)
        result = train(model, InstructionBatches(_instructions(8), 2, pad_id=0), cfg)
        runs.append((result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (la, pa), (lb, pb) = runs
    assert la == pytest.approx(lb, abs=1e-6)
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-6


@pytest.mark.parametrize(("available", "chunked"), [(1 << 14, True), (1 << 40, False)])
def test_auto_loss_chunking_follows_the_memory_available(monkeypatch: pytest.MonkeyPatch, available: int, chunked: bool) -> None:
    """``loss_chunk_tokens="auto"`` (the default) chunks only when the full logits would crowd the device."""
    import shear.training.loop as loop
    import shear.training.peak_memory as memory

    calls: list[int] = []
    real = loop.chunked_causal_lm_loss_sum

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    monkeypatch.setattr(loop, "chunked_causal_lm_loss_sum", spy)
    model, _ = build("llama", lora=True)
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=2, seq_len=16, gradient_checkpointing=False)
    assert cfg.loss_chunk_tokens == "auto"
    train(model, InstructionBatches(_instructions(8), 2, pad_id=0), cfg)
    assert bool(calls) is chunked
    with pytest.raises(TrainingError, match="loss_chunk_tokens"):
        TrainConfig(steps=2, loss_chunk_tokens="fast")


def test_head_bypass_restores_the_head_after_an_error() -> None:
    from shear.kernels.losses import head_bypassed, output_head

    model, _ = build("llama")
    head = model.lm_head
    with pytest.raises(RuntimeError, match="boom"), head_bypassed(model):
        assert isinstance(model.lm_head, torch.nn.Identity)
        raise RuntimeError("boom")
    assert model.lm_head is head
    bert, _ = build("bert")
    assert output_head(bert) is None  # not a plain causal-LM head: train() keeps the full logits
    with pytest.raises(ValueError, match="no plain output head"), head_bypassed(bert):
        pass
