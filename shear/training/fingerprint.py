"""What a training run is, as a few digests: a checkpoint resumes only the run that wrote it.

A :class:`RunFingerprint` holds a digest of the model's starting weights (a strided sample of every
tensor, with all names, shapes and dtypes; LoRA adapters left out, since their random start is
restored from the checkpoint), a digest of the data the run reads, the caller's options (a pass's
``ratio``, ...) and shear's version. It is cheap: at most 4096 values per tensor are read.

Example:
    >>> import torch
    >>> a = RunFingerprint.of(torch.nn.Linear(4, 2), data="d1", options={"ratio": 0.2})
    >>> b = RunFingerprint.of(torch.nn.Linear(4, 2), data="d1", options={"ratio": 0.5})
    >>> a.differences(b.to_dict())[-1]
    'options: ratio was 0.5, now 0.2'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from shear.model.facts import is_lora_param
from shear.version import __version__

__all__ = ["RunFingerprint", "tensor_digest", "options_of"]

_SAMPLE = 4096
"""Values read from each tensor for a digest."""


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and a strided sample of the values of each tensor.

    Example:
        >>> t = torch.arange(10.0)
        >>> tensor_digest([("t", t)]) == tensor_digest([("t", t.clone())])
        True
        >>> tensor_digest([("t", t)]) == tensor_digest([("t", t + 1)])
        False
    """
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
        h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def options_of(
    obj: Any, *, skip: Iterable[str] = ("checkpoint_dir", "checkpoint_every", "gradient_checkpointing")
) -> dict[str, Any]:
    """The fields of a dataclass (a pass) as run options, without those that only say where or how often
    to checkpoint, or how much memory the same steps take (gradient checkpointing).

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class P:
        ...     ratio: float = 0.2
        ...     checkpoint_dir: str = "ckpt"
        >>> options_of(P())
        {'ratio': 0.2}
    """
    left_out = set(skip)
    return {k: v for k, v in asdict(obj).items() if k not in left_out}


def _model_digest(model: nn.Module) -> str:
    state = model.state_dict(keep_vars=True)
    return tensor_digest((n, t) for n, t in sorted(state.items()) if not is_lora_param(n))


def _canonical(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as they survive JSON (what a checkpoint stores), for an exact comparison."""
    return dict(json.loads(json.dumps(dict(options), sort_keys=True, default=str)))


@dataclass(frozen=True)
class RunFingerprint:
    """Digests of a run's starting model and data, its options and shear's version."""

    model: str
    """:func:`tensor_digest` of the model's tensors (adapters left out) when the run starts."""
    data: str
    """Digest of the batch stream's content (``fingerprint()`` of the stream), "" when it has none."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options of the caller that change the result but are not in the TrainConfig (e.g. LHSPG's ratio)."""
    shear: str = ""
    """shear's version: another version may compute another result."""

    @classmethod
    def of(cls, model: nn.Module, *, data: str = "", options: Mapping[str, Any] | None = None) -> RunFingerprint:
        """The fingerprint of a run of ``model`` on data with digest ``data`` and these ``options``."""
        return cls(model=_model_digest(model), data=data, options=_canonical(options or {}), shear=__version__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in every checkpoint's ``trainer.json``)."""
        return asdict(self)

    def differences(self, saved: Mapping[str, Any] | None) -> list[str]:
        """What differs from a checkpoint's stored fingerprint, in words (empty: the same run)."""
        if not saved:
            return ["the checkpoint has no run fingerprint (written by an older shear)"]
        out = []
        if saved.get("model") != self.model:
            out.append("the model's weights differ")
        if saved.get("data") != self.data:
            out.append("the training data differs")
        if saved.get("shear") != self.shear:
            out.append(f"shear version was {saved.get('shear')}, now {self.shear}")
        old = saved.get("options") or {}
        changed = [
            f"{k} was {old.get(k)!r}, now {self.options.get(k)!r}"
            for k in sorted(set(old) | set(self.options)) if old.get(k) != self.options.get(k)
        ]
        if changed:
            out.append("options: " + "; ".join(changed))
        return out
