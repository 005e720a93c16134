"""The LoRA training runtime shared by LHSPG, recovery fine-tuning and EBFT.

* :class:`TrainConfig` — validated settings of a run;
* :class:`TokenBatches`, :class:`InstructionBatches` — deterministic, resumable, shardable batches;
* :func:`train` — AdamW, grad accumulation, bf16, gradient checkpointing, hooks, atomic checkpoints
  with exact resume, data parallelism through accelerate / torch.distributed;
* :class:`TrainHook`, :class:`TrainState` — called after every optimizer step (LHSPG edits here);
* :func:`ensure_lora`, :func:`lora_layers`, :func:`merge_and_reset_lora` — the adapters;
* :class:`DistillLoss` — cross-entropy plus a chunked KL to the dense teacher's logits;
* :class:`PeakMemory` and byte counters — memory of a run.

Example:
    >>> from shear.training import TrainConfig, TokenBatches, ensure_lora, train   # doctest: +SKIP
    >>> model, _ = ensure_lora(model)                                                      # doctest: +SKIP
    >>> cfg = TrainConfig(steps=100, batch_size=4, seq_len=128)                            # doctest: +SKIP
    >>> result = train(model, TokenBatches.from_config({"web": ids}, cfg), cfg)            # doctest: +SKIP
"""

from shear.kernels.losses import causal_lm_loss_sum, count_targets
from shear.training.adapters import ensure_lora, is_lora_param, lora_layers, merge_and_reset_lora
from shear.training.batches import IGNORE_INDEX, BatchStream, InstructionBatches, TokenBatches
from shear.training.checkpoints import (
    TrainCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from shear.training.config import SCHEDULERS, TrainConfig
from shear.training.distill import DistillLoss, chunked_distill_sums
from shear.training.distributed import Parallel, detect_parallel
from shear.training.hooks import TrainHook, TrainState
from shear.training.loop import LossFn, select_trainable, train
from shear.training.optim import Schedule, build_optimizer, build_scheduler, reset_optimizer_state
from shear.training.peak_memory import (
    MemoryStats,
    PeakMemory,
    frozen_bytes,
    lora_state_bytes,
    tensor_bytes,
)
from shear.training.result import StepLog, TrainResult
from shear.training.rng import capture_rng, restore_rng, seed_everything

__all__ = [
    "TrainConfig", "SCHEDULERS",
    "BatchStream", "TokenBatches", "InstructionBatches", "IGNORE_INDEX",
    "train", "select_trainable", "LossFn", "TrainResult", "StepLog",
    "TrainHook", "TrainState",
    "ensure_lora", "lora_layers", "merge_and_reset_lora", "is_lora_param",
    "Schedule", "build_optimizer", "build_scheduler", "reset_optimizer_state",
    "TrainCheckpoint", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
    "Parallel", "detect_parallel",
    "MemoryStats", "PeakMemory", "tensor_bytes", "frozen_bytes", "lora_state_bytes",
    "causal_lm_loss_sum", "count_targets", "DistillLoss", "chunked_distill_sums",
    "seed_everything", "capture_rng", "restore_rng",
]
