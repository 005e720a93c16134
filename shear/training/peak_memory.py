"""Peak memory of a training run, and the byte counts it is compared with.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset at the start). On CPU it is the
process's peak resident set size: on Linux the kernel's high-water mark ``VmHWM`` is reset at the
start (``echo 5 > /proc/self/clear_refs``) and read at the end, an exact peak; where that is not
possible, the lifetime ``ru_maxrss`` of :mod:`resource` (an upper bound: it may predate the run).
:attr:`MemoryStats.method` says which. CPU figures include the interpreter and libraries, so compare
``peak_bytes - baseline_bytes`` (what training added) rather than the raw peak.

Example:
    >>> import torch
    >>> with PeakMemory(torch.device("cpu")) as meter:
    ...     x = torch.ones(1 << 20)
    >>> meter.stats.peak_bytes >= meter.stats.baseline_bytes
    True
    >>> tensor_bytes([torch.ones(4, 4)])
    64
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

__all__ = [
    "MemoryStats", "PeakMemory", "tensor_bytes", "lora_state_bytes", "frozen_bytes", "current_rss_bytes",
    "activation_bytes", "predict_activation_bytes", "available_bytes", "checkpointing_decision",
    "auto_checkpointing", "ACTIVATION_COEFFICIENTS", "CHECKPOINTING_FRACTION", "auto_loss_chunking",
    "LOGITS_FRACTION",
]


@dataclass(frozen=True)
class MemoryStats:
    """Peak and starting memory of a run, in bytes, and how they were measured."""

    peak_bytes: int
    baseline_bytes: int
    method: str
    """``"cuda_max_allocated"``, ``"linux_vmhwm"`` or ``"ru_maxrss"``."""

    @property
    def added_bytes(self) -> int:
        """Peak above the start: activations, gradients, optimizer state, temporaries."""
        return max(0, self.peak_bytes - self.baseline_bytes)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (0 where it cannot be read)."""
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def _ru_maxrss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)


class PeakMemory:
    """Context manager measuring peak memory on ``device`` while its block runs (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = MemoryStats(0, 0, "none")
        self._method = ""
        self._baseline = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._method, self._baseline = "cuda_max_allocated", torch.cuda.memory_allocated(self.device)
            return self
        self._baseline = current_rss_bytes()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._method = "linux_vmhwm" if _status_kb("VmHWM") is not None else "ru_maxrss"
        except OSError:
            self._method = "ru_maxrss"
        return self

    def read(self) -> MemoryStats:
        """The statistics so far (also valid inside the block)."""
        if self._method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._method == "linux_vmhwm":
            peak = _status_kb("VmHWM") or 0
        else:
            peak = _ru_maxrss_bytes()
        return MemoryStats(int(peak), int(self._baseline), self._method)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stats = self.read()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each distinct storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers that do not train."""
    return tensor_bytes([p for p in model.parameters() if not p.requires_grad] + list(model.buffers()))


def lora_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the trainable parameters, their gradients (same size) and the optimizer's state.

    Without an optimizer AdamW's two fp32 moments per parameter are assumed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = 2 * tensor_bytes(params)
    if optimizer is None:
        return total + sum(2 * p.numel() * 4 for p in params)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return total + tensor_bytes(state)


# -- when to checkpoint ------------------------------------------------------------------------

ACTIVATION_COEFFICIENTS: dict[int, tuple[int, int]] = {2: (38, 10), 4: (26, 16)}
"""Bytes autograd saves per token and decoder layer, per unit of ``hidden`` and of ``intermediate``,
for frozen weights of 2 (bf16/fp16) or 4 (fp32) bytes. Measured with ``saved_tensors_hooks`` on
transformers 5 LLaMA (SDPA attention, SwiGLU, RMSNorm) with peft LoRA on every linear layer of the
blocks: a 16-bit model saves its norm inputs in fp32 and LoRA keeps an fp32 copy of each adapted
layer's input, hence more bytes per hidden unit than an fp32 one. The attention term (a few hundred
bytes per token with SDPA) is left out."""

CHECKPOINTING_FRACTION = 0.5
"""``gradient_checkpointing="auto"`` turns checkpointing on when a step's predicted activations
exceed this fraction of the memory available on the model's device."""


def activation_bytes(*, batch: int, seq_len: int, hidden: int, intermediate: int, layers: int, dtype_bytes: int) -> int:
    """Predicted activation memory of one micro-batch's forward without gradient checkpointing:

    ``batch * seq_len * layers * (c_h * hidden + c_i * intermediate)`` bytes, with ``(c_h, c_i)`` from
    :data:`ACTIVATION_COEFFICIENTS` for ``dtype_bytes`` (the frozen weights' element size). The loss's
    logits are not counted: the chunked loss keeps one chunk of them, checkpointed or not.

    Example:
        >>> gb = activation_bytes(batch=4, seq_len=512, hidden=4096, intermediate=11008, layers=32, dtype_bytes=2)
        >>> round(gb / 2**30, 1)   # LLaMA-2-7B in bf16 at 4 x 512: more than its 12.6 GiB of weights
        16.2
    """
    c_h, c_i = ACTIVATION_COEFFICIENTS[2 if dtype_bytes <= 2 else 4]
    return batch * seq_len * layers * (c_h * hidden + c_i * intermediate)


def _text_config(model: nn.Module) -> Any:
    from shear.kernels.losses import _causal_lm

    config = getattr(_causal_lm(model), "config", None)
    return getattr(config, "text_config", None) or config


def predict_activation_bytes(model: nn.Module, batch: int, seq_len: int) -> int | None:
    """:func:`activation_bytes` of ``model`` (a transformers decoder: ``hidden_size``,
    ``num_hidden_layers``, ``intermediate_size`` (default 4x hidden) read from its config, the element
    size from its first floating parameter); ``None`` when the config does not say."""
    from shear.model.devices import model_dtype

    config = _text_config(model)
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(hidden, int) or not isinstance(layers, int):
        return None
    intermediate = getattr(config, "intermediate_size", None)
    intermediate = intermediate if isinstance(intermediate, int) else 4 * hidden
    size = torch.finfo(model_dtype(model)).bits // 8
    return activation_bytes(batch=batch, seq_len=seq_len, hidden=hidden, intermediate=intermediate, layers=layers,
                            dtype_bytes=size)


def available_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory a step can still use on ``device``: on CUDA the driver's free memory plus what torch's
    allocator holds unused (``mem_get_info`` + reserved - allocated); on the CPU ``MemAvailable`` of
    ``meminfo`` (Linux), else ``psutil.virtual_memory().available``; ``None`` when unknown (other devices)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def checkpointing_decision(
    predicted: int | None, available: int | None, fraction: float = CHECKPOINTING_FRACTION
) -> tuple[bool, str]:
    """``(on, why)``: checkpoint when ``predicted`` activation bytes exceed ``fraction`` of ``available``.

    Unknown sizes leave it off (nothing says memory is tight).

    Example:
        >>> checkpointing_decision(6 << 30, 8 << 30)[0], checkpointing_decision(1 << 30, 8 << 30)[0]
        (True, False)
    """
    if predicted is None or available is None:
        return False, "activation memory or available memory unknown"
    gib = 1 << 30
    on = predicted > fraction * available
    verb = "exceed" if on else "fit in"
    return on, (
        f"a step's activations are predicted at {predicted / gib:.2f} GiB, which {verb} {fraction:.0%} of the "
        f"{available / gib:.2f} GiB available"
    )


LOGITS_FRACTION = 0.125
"""``loss_chunk_tokens="auto"`` chunks the loss when a step's full logits would exceed this fraction
of the memory available on the model's device."""


def auto_loss_chunking(
    tokens: int, vocab: int, device: torch.device, *, available: int | None = None
) -> tuple[bool, str]:
    """``(on, why)`` for ``loss_chunk_tokens="auto"``: chunk when ``tokens x vocab`` fp32 logits, their
    log-softmax and their gradient (12 bytes per logit) exceed :data:`LOGITS_FRACTION` of the available
    memory (:func:`available_bytes`, or ``available``); unknown memory chunks (the safe side).

    Example:
        >>> auto_loss_chunking(2048, 128256, torch.device("cpu"), available=80 << 30)[0]
        False
        >>> auto_loss_chunking(2048, 128256, torch.device("cpu"), available=16 << 30)[0]
        True
    """
    free = available if available is not None else available_bytes(device)
    need = 12 * tokens * vocab
    if free is None:
        return True, "the memory available is unknown"
    on = need > LOGITS_FRACTION * free
    verb = "exceed" if on else "fit in"
    return on, (f"a step's full logits take {need / (1 << 30):.2f} GiB, which {verb} {LOGITS_FRACTION:.1%} of the "
                f"{free / (1 << 30):.2f} GiB available on {device.type}")


def auto_checkpointing(
    model: nn.Module, batch: int, seq_len: int, device: torch.device, *, available: int | None = None
) -> tuple[bool, str]:
    """What ``gradient_checkpointing="auto"`` does for ``model`` at ``batch x seq_len`` on ``device``:
    :func:`checkpointing_decision` of :func:`predict_activation_bytes` and :func:`available_bytes`
    (or ``available``)."""
    free = available if available is not None else available_bytes(device)
    on, why = checkpointing_decision(predict_activation_bytes(model, batch, seq_len), free)
    return on, f"{why} on {device.type}"
