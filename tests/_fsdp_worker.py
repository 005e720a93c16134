"""The LoRAShear pipeline under FSDP2, for tests/test_fsdp.py (it must run under a launcher).

``torchrun --nproc_per_node 2 --standalone tests/_fsdp_worker.py OUT_DIR [plan ...]`` runs
:func:`run_pipeline` once per plan entry on gloo with ``parallel=fsdp`` (``SHEAR_PARALLEL=fsdp``) and
``batch_size=2`` per rank, and writes ``<name>-rank<r>.safetensors`` (the final weights) and
``<name>-rank<r>.json`` (the zero structures, losses) under ``OUT_DIR``. A plan entry is
``name[:ckpt[:crash_at[:kill]]]``: with ``ckpt`` LHSPG checkpoints there every 3 steps; with
``crash_at`` LHSPG's hook raises after that step (``kill``: SIGKILLs its own process instead) and the
entry's pipeline is run again, resuming. The test runs the same pipeline in one process with
``batch_size=4``: the same global batch, so the same run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

PIPELINE = (
    "lora{{r=4}},discover-groups,"
    "lhspg{{ratio=0.3,periods=2,steps_per_period=3,warmup=1,batch_size={batch},seq_len=32,lr=0.001,"
    "calibration=2{ckpt}}},"
    "erase,"
    "recover-dynamic{{stages=pretrain,max_rounds=1,steps_per_round=2,batch_size={batch},seq_len=32,eval_windows=1}},"
    "merge-lora"
)

__all__ = ["PIPELINE", "run_pipeline", "Crash"]


class Crash(RuntimeError):
    """Raised by the patched LHSPG hook to stop a run mid-period."""


def run_pipeline(batch: int, ckpt: str | None = None, crash_at: int | None = None, kill: bool = False) -> dict[str, Any]:
    """The pipeline on the tiny LLaMA: the final state dict, the zero structures of LHSPG and its losses."""
    from shear.data import TextData
    from shear.passes import PassManager
    from shear.passes.base import Context
    from shear.passes.lorashear.lhspg import LhspgHook
    from shear.zoo import load_tiny_llama

    torch.set_num_threads(1)
    model, tok, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tok, max_train_chars=30_000, max_val_chars=4_000)
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    extra = f',checkpoint_dir="{ckpt}",checkpoint_every=3' if ckpt else ""
    original = LhspgHook.after_optimizer_step

    def stopping(self: LhspgHook, state: Any) -> None:
        original(self, state)
        if crash_at is not None and state.step == crash_at:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Crash(f"stopped after step {crash_at}")

    LhspgHook.after_optimizer_step = stopping  # type: ignore[method-assign]
    ctx = Context(model=model, example_inputs=ids, data=data)
    ctx.results["dense-model"] = copy.deepcopy(model)
    try:
        PassManager(PIPELINE.format(batch=batch, ckpt=extra)).run(ctx)
    finally:
        LhspgHook.after_optimizer_step = original  # type: ignore[method-assign]
    lhspg = ctx.results["lhspg"]
    return {
        "state": {k: v.detach().contiguous().clone() for k, v in ctx.model.state_dict().items()},
        "zeroed": {str(g): v for g, v in sorted(lhspg.zeroed.items())},
        "losses": lhspg.losses,
        "recovery_steps": ctx.results["recover-dynamic"].steps,
        "warnings": list(ctx.warnings),
    }


def _save(out: Path, name: str, rank: int, result: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = result.pop("state")
    seen: dict[int, str] = {}
    tensors = {}
    for k, v in state.items():  # tied weights once
        if v.data_ptr() in seen:
            continue
        seen[v.data_ptr()] = k
        tensors[k] = v
    save_file(tensors, str(out / f"{name}-rank{rank}.safetensors"))
    (out / f"{name}-rank{rank}.json").write_text(json.dumps(result))


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    os.environ.setdefault("SHEAR_PARALLEL", "fsdp")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(argv[0])
    for entry in argv[1:]:
        name, *rest = entry.split(":")
        ckpt = str(out / rest[0]) if rest and rest[0] else None
        crash_at = int(rest[1]) if len(rest) > 1 else None
        kill = len(rest) > 2 and rest[2] == "kill"
        if crash_at is not None:
            try:
                run_pipeline(2, ckpt, crash_at, kill)
                raise SystemExit(f"{name}: the run did not stop at step {crash_at}")
            except Exception as e:  # the pass manager wraps Crash in a PassError
                if "stopped after step" not in str(e):
                    raise
        _save(out, name, rank, run_pipeline(2, ckpt))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(sys.argv[1:])
