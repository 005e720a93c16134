"""Seed, capture and restore every random number generator a training step may draw from.

torch (CPU and every CUDA device), python ``random`` and numpy. Tensor states go to the binary part
of a checkpoint, python's and numpy's to its JSON part (``tensor_states`` / ``plain_states``).

Example:
    >>> import torch
    >>> seed_everything(3)
    >>> tensors, plain = capture_rng()
    >>> a = torch.rand(2)
    >>> restore_rng(tensors, plain)
    >>> torch.equal(torch.rand(2), a)
    True
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "capture_rng", "restore_rng"]


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), python ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensor states, JSON-able states)`` of torch CPU/CUDA, python and numpy generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    plain = {
        "python": [version, list(state), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
