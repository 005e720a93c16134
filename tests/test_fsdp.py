"""FSDP2 training on CPU: two gloo ranks run the LoRAShear pipeline as one process does.

``tests/_fsdp_worker.py`` runs ``lora,discover-groups,lhspg,erase,recover-dynamic,merge-lora`` on the
tiny LLaMA under ``torchrun --nproc_per_node 2`` with ``SHEAR_PARALLEL=fsdp`` and 2 rows per rank;
this process runs it with 4 rows: the same global batches. The FSDP run must end with the same
zero structures, the same shapes and weights within 1e-5 (measured: 1.5e-7; the same run through
DDP differs from FSDP by 2.4e-7), and a run stopped mid-period and resumed from its sharded
checkpoint must end bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from shear.errors import CheckpointError, DistributedError
from shear.model.dtensor import gather, is_sharded, writable
from shear.training import TokenBatches, TrainConfig, train
from shear.training.dcp_checkpoints import check_sharded_checkpoint
from shear.training.distributed import detect_parallel, requested_strategy

sys.path.insert(0, str(Path(__file__).parent))
from _fsdp_worker import run_pipeline  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHEAR_PARALLEL", "ACCELERATE_USE_FSDP")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _launch(out: Path, *plan: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run(
        [str(torchrun), "--nproc_per_node", str(nproc), "--standalone", str(REPO / "tests" / "_fsdp_worker.py"),
         str(out), *plan],
        env=_env(), capture_output=True, text=True, timeout=300,
    )


def _result(out: Path, name: str, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(out / f"{name}-rank{rank}.safetensors")), json.loads((out / f"{name}-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch: an uninterrupted run, and a run stopped after step 5 (checkpoint at 3) then resumed."""
    out = tmp_path_factory.mktemp("fsdp")
    proc = _launch(out, "plain", "resumed:ckpt:5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return run_pipeline(batch=4)


def test_fsdp_pipeline_equals_one_process(fsdp_run: Path, single: dict[str, Any]) -> None:
    ranks = [_result(fsdp_run, "plain", r) for r in range(2)]
    (weights, info), (weights1, info1) = ranks
    assert weights.keys() == weights1.keys() and all(torch.equal(weights[k], weights1[k]) for k in weights)
    assert info["zeroed"] == info1["zeroed"]
    mine = {str(g): [int(i) for i in v] for g, v in single["zeroed"].items()}
    assert info["zeroed"] == mine and sum(len(v) for v in mine.values()) > 0  # the same pruned structures
    assert info["recovery_steps"] == 2
    state = single["state"]
    assert all(weights[k].shape == state[k].shape for k in weights)
    assert max((weights[k] - state[k]).abs().max().item() for k in weights) < 1e-5
    assert info["losses"] == pytest.approx(single["losses"], abs=1e-5)


def test_fsdp_resume_after_a_stop_mid_period_is_exact(fsdp_run: Path) -> None:
    plain, plain_info = _result(fsdp_run, "plain")
    resumed, info = _result(fsdp_run, "resumed")
    assert any("resumed from step 3 of 7" in w for w in info["warnings"]), info["warnings"]
    assert info["zeroed"] == plain_info["zeroed"] and info["losses"] == plain_info["losses"]
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)


def test_a_sharded_checkpoint_names_its_world_size(fsdp_run: Path) -> None:
    ckpt = fsdp_run / "ckpt" / "step-7"
    assert check_sharded_checkpoint(ckpt, 2)["world_size"] == 2
    with pytest.raises(CheckpointError, match=r"written by 2 processes and this run has 3.*--nproc_per_node 2"):
        check_sharded_checkpoint(ckpt, 3)


def test_a_single_process_run_does_not_resume_a_sharded_checkpoint(fsdp_run: Path, tmp_path: Path) -> None:
    import shutil

    from _train_worker import ddp_model, ddp_tokens

    shutil.copytree(fsdp_run / "ckpt", tmp_path / "ckpt")
    cfg = TrainConfig(steps=7, batch_size=2, seq_len=16, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3)
    with pytest.raises(CheckpointError, match=r"written by an FSDP run on 2 processes; resume it the same way"):
        train(ddp_model(), TokenBatches.from_config(ddp_tokens(), cfg), cfg)


def test_fsdp_without_a_process_group_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SHEAR_PARALLEL", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match=r"needs an initialised torch.distributed process group.*torchrun"):
        detect_parallel(None, "fsdp")
    monkeypatch.setenv("SHEAR_PARALLEL", "fsdp")
    from _train_worker import ddp_model, ddp_tokens

    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16)
    with pytest.raises(DistributedError, match=r"accelerate launch --config_file configs/accelerate_fsdp2.yaml"):
        train(ddp_model(), TokenBatches.from_config(ddp_tokens(), cfg), cfg)


def test_the_strategy_comes_from_the_argument_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHEAR_PARALLEL", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert requested_strategy() == "ddp" and detect_parallel().strategy == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets from an FSDP config
    assert requested_strategy() == "fsdp" and requested_strategy("ddp") == "ddp"
    with pytest.raises(DistributedError, match=r"unknown parallel strategy 'zero3'.*\('ddp', 'fsdp'\)"):
        requested_strategy("zero3")


def test_plain_tensors_pass_through_the_shard_helpers() -> None:
    t = torch.arange(6.0).view(3, 2)
    assert not is_sharded(t) and gather(t) is t
    with writable(t) as w:
        assert w is t
        w[0] = 0
    assert t[0].tolist() == [0.0, 0.0]


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    """Both ranks SIGKILLed after step 5 (torchrun fails), relaunched: the same weights as an uninterrupted run.

    48 s measured on 2 shared CPU cores (two launches, three pipeline runs).
    """
    killed = _launch(tmp_path, "killed:ckpt:5:kill")
    assert killed.returncode != 0 and not (tmp_path / "killed-rank0.json").exists()
    again = _launch(tmp_path, "plain", "killed:ckpt")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    plain, _ = _result(tmp_path, "plain")
    resumed, info = _result(tmp_path, "killed")
    assert any("resumed from step 3 of 7" in w for w in info["warnings"]), info["warnings"]
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)


def test_shard_helpers_docstring_example() -> None:
    import doctest

    import shear.model.dtensor as mod

    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
