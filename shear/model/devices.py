"""Where a model lives, and random draws that are the same on every device.

Device and dtype are read from the weights, never assumed. :func:`model_device` is the one place
that answers "which device is this model on"; :func:`seeded_draw` fills a tensor on any device from
a seeded CPU generator (draw on the CPU, then copy), so a run gives the same numbers on a GPU as on
the CPU and a CPU generator is never handed to a CUDA kernel (which raises).

Example:
    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> model_device(net), model_dtype(net)
    (device(type='cpu'), torch.float32)
    >>> w = torch.empty(2, 3)
    >>> gen = torch.Generator().manual_seed(0)
    >>> _ = seeded_draw(w, lambda t: torch.nn.init.uniform_(t, generator=gen))
    >>> torch.equal(w, torch.empty(2, 3).uniform_(generator=torch.Generator().manual_seed(0)))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from shear.errors import InputError

__all__ = [
    "model_device", "model_dtype", "seeded_draw", "untiled_linears", "TENSOR_CORE_MULTIPLE", "check_device",
    "available_devices",
]


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of ``model``'s first parameter (then buffer); ``default`` for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default)


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``model``'s first floating parameter: the precision its frozen weights are kept in."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return default


@torch.no_grad()
def seeded_draw(tensor: torch.Tensor, draw: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """Fill ``tensor`` in place with ``draw`` run on a CPU tensor of its shape and dtype, then copied.

    ``draw`` calls an in-place initialiser with a CPU ``torch.Generator`` (``uniform_``,
    ``kaiming_uniform_``, ...). On a CPU tensor it runs in place, so results are bit-identical to
    calling the initialiser directly; on any other device the CPU draw is copied over. Meta tensors
    are left as they are (they hold no values).
    """
    if tensor.device.type == "cpu":
        draw(tensor)
    elif tensor.device.type != "meta":
        host = torch.empty(tensor.shape, dtype=tensor.dtype)
        draw(host)
        tensor.copy_(host)
    return tensor


TENSOR_CORE_MULTIPLE = 64
"""Width (features) that GPU matrix kernels tile by: a Linear whose in or out features are not a
multiple of it falls off the tensor-core fast path (measurements: docs/results/speed.md)."""


def untiled_linears(model: nn.Module, multiple: int = TENSOR_CORE_MULTIPLE) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` whose in or out features are not multiples of
    ``multiple`` (layers narrower than ``multiple`` on both sides are left out).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(128, 96), torch.nn.Linear(96, 128), torch.nn.Linear(8, 4))
        >>> untiled_linears(net)
        ['0', '1']
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and max(m.in_features, m.out_features) >= multiple:
            if m.in_features % multiple or m.out_features % multiple:
                out.append(name)
    return out


def check_device(spec: str | torch.device, what: str = "device") -> torch.device:
    """``spec`` as a :class:`torch.device` that exists on this machine, or :class:`~shear.errors.InputError`
    naming it (``what`` says where it came from, e.g. ``--device``) and the devices there are.

    Example:
        >>> check_device("cpu")
        device(type='cpu')
        >>> try:
        ...     check_device("toaster:7", "--device")
        ... except InputError as e:
        ...     print(type(e).__name__)
        InputError
    """
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(
            f"{what} {spec!r} is not a torch device ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"give one of {available_devices()}"
        ) from e
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        ok, count = bool(torch.backends.mps.is_available()), 1
    elif dev.type in ("cuda", "xpu") and backend is not None:
        ok, count = bool(backend.is_available()), int(backend.device_count()) if backend.is_available() else 0
    else:
        raise InputError(f"{what} {spec!r}: shear runs on {sorted({'cpu', 'cuda', 'mps', 'xpu'})} devices; give one of {available_devices()}")
    if not ok:
        raise InputError(
            f"{what} {spec!r}: this machine has no {dev.type.upper()} device (torch {torch.__version__} sees none); "
            f"give one of {available_devices()}, or install a torch build with {dev.type} support"
        )
    if dev.index is not None and not 0 <= dev.index < count:
        raise InputError(
            f"{what} {spec!r}: there are {count} {dev.type} devices (0..{count - 1}); give one of {available_devices()}"
        )
    return dev


def available_devices() -> list[str]:
    """The devices this machine can run a model on, e.g. ``['cpu', 'cuda:0']``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    return out
