"""Training runs for tests/test_training.py that must live in their own process.

``python tests/_train_worker.py resume CKPT_DIR OUT [KILL_AT]`` trains the resume model (and is
SIGKILLed by its own hook after step KILL_AT); ``torchrun --nproc_per_node 2 --standalone
tests/_train_worker.py ddp OUT_DIR`` trains data-parallel on gloo through accelerate (``ddp-raw``:
through a plain ``torch.distributed`` process group). The test
imports the same builders to run the reference in process.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402

from shear.training import (  # noqa: E402
    TokenBatches,
    TrainConfig,
    TrainHook,
    TrainResult,
    TrainState,
    ensure_lora,
    reset_optimizer_state,
    train,
)

__all__ = ["EditHook", "resume_run", "ddp_config", "ddp_model", "ddp_tokens", "pattern_tokens"]


def pattern_tokens(n: int = 4000, period: int = 11, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a repeating pattern with 10% random tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) % period + 3
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(0, 96, (int(noise.sum()),), generator=g)
    return ids


class EditHook(TrainHook):
    """Edits a frozen base weight and a LoRA B row after each step, as LHSPG does, with state of its own.

    Draws from its own generator and from the global torch RNG, so an exact resume needs both the
    hook state and the RNG states restored. Kills its own process after step ``kill_at``.
    """

    def __init__(self, kill_at: int | None = None) -> None:
        self.gen = torch.Generator().manual_seed(123)
        self.edits = 0
        self.trace = torch.zeros(3)
        self.kill_at = kill_at

    def after_optimizer_step(self, state: TrainState) -> None:
        named = dict(state.model.named_parameters())
        base = named["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
        lora_b = named["base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight"]
        with torch.no_grad():
            row = int(torch.randint(0, base.shape[0], (1,), generator=self.gen))
            base[row] *= 0.9 + 0.05 * torch.rand(()).item()
            lora_b[row % lora_b.shape[0]] = 0
        reset_optimizer_state(state.optimizer, [lora_b], rows=[row % lora_b.shape[0]])
        self.edits += 1
        self.trace += torch.rand(3, generator=self.gen)
        if self.kill_at is not None and state.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "edits": self.edits, "trace": self.trace.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.edits = int(state["edits"])
        self.trace = state["trace"].clone()


def resume_run(ckpt_dir: str | None, kill_at: int | None = None) -> tuple[torch.nn.Module, TrainResult, EditHook]:
    """8 steps of LoRA (dropout 0.1) on the tiny LLaMA with :class:`EditHook`, checkpoints every 2."""
    torch.set_num_threads(1)
    model, _ = build("llama")
    torch.manual_seed(1)
    model, _ = ensure_lora(model, r=4, dropout=0.1)
    cfg = TrainConfig(steps=8, lr=1e-3, batch_size=2, seq_len=16, grad_accum=2, warmup_steps=2,
                      scheduler="cosine", checkpoint_dir=ckpt_dir, checkpoint_every=2 if ckpt_dir else 0)
    hook = EditHook(kill_at)
    result = train(model, TokenBatches.from_config({"a": pattern_tokens(), "b": pattern_tokens(seed=1)}, cfg),
                   cfg, hooks=[hook])
    return model, result, hook


def ddp_config(batch_size: int) -> TrainConfig:
    return TrainConfig(steps=4, lr=1e-3, batch_size=batch_size, seq_len=16, grad_accum=2, max_grad_norm=1.0)


def ddp_model() -> torch.nn.Module:
    model, _ = build("llama", lora=True)
    return model


def ddp_tokens() -> dict[str, torch.Tensor]:
    return {"a": pattern_tokens(), "b": pattern_tokens(seed=1)}


def _lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "resume":
        ckpt, out = argv[1], argv[2]
        kill_at = int(argv[3]) if len(argv) > 3 else None
        model, _, _ = resume_run(ckpt, kill_at)
        save_file({n: p.detach().contiguous() for n, p in model.state_dict().items()}, out)
    elif mode in ("ddp", "ddp-raw"):
        torch.set_num_threads(1)
        out = Path(argv[1])
        model = ddp_model()
        cfg = dataclasses.replace(ddp_config(batch_size=2), checkpoint_dir=str(out / "ckpt"), checkpoint_every=2)
        batches = TokenBatches.from_config(ddp_tokens(), cfg)
        if mode == "ddp":  # through accelerate
            from accelerate import Accelerator

            accelerator = Accelerator(cpu=True)
            result = train(model, batches, cfg, accelerator=accelerator)
            rank = accelerator.process_index
        else:  # plain torch.distributed: train() wraps the model in DDP itself
            import torch.distributed as dist

            dist.init_process_group("gloo")
            result = train(model, batches, cfg)
            rank = dist.get_rank()
        save_file(_lora_state(model), str(out / f"rank{rank}.safetensors"))
        (out / f"losses{rank}.txt").write_text(" ".join(repr(x) for x in result.losses))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
