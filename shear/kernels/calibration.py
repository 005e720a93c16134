"""Calibration statistics of linear-layer inputs, collected with forward hooks (Wanda, SparseGPT).

Activation-aware pruners score a weight ``W_ij`` with statistics of the layer's input ``X``
(``[tokens, in]``) on calibration text:

- Wanda: the column norms ``‖X_j‖₂`` (:attr:`LayerStats.col_norms`);
- SparseGPT: the Hessian of the layer-wise reconstruction loss, ``H = 2 XᵀX / tokens``
  (:attr:`LayerStats.hessian`).

Which layers: :func:`prunable_linears` finds every ``nn.Linear`` of a module; for a peft LoRA
layer it is the frozen ``base_layer`` (which sees the same input as the LoRA branch), never
``lora_A`` / ``lora_B``. :func:`target_linears` restricts that to the decoder blocks of an LLM (no
embeddings, no ``lm_head``).

Two ways to run:

- :func:`collect_stats` runs the whole (dense) model once with hooks;
- :func:`sequential_prune` goes block by block, as the reference Wanda/SparseGPT code does for
  decoder LLMs: block 0's inputs are captured (a hook stops the forward pass there), each block is
  run on its inputs to collect its layers' statistics, its layers are pruned, and the *pruned*
  block's outputs become the next block's inputs, so later layers see what the sparse model feeds
  them. The block machinery is :mod:`shear.kernels.ebft`.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> with StatsCollector(prunable_linears(model), hessian=True) as col:
    ...     _ = model(torch.randn(10, 4))
    >>> col.stats["0"].count, tuple(col.stats["2"].hessian.shape)
    (10, (3, 3))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from shear.errors import DataError, KernelError
from shear.model.blocks import block_path, decoder_blocks
from shear.model.devices import model_device

if TYPE_CHECKING:
    from shear.progress import ProgressBar

__all__ = [
    "LayerStats",
    "StatsCollector",
    "prunable_linears",
    "target_linears",
    "collect_stats",
    "sequential_prune",
]


@dataclass
class LayerStats:
    """Streaming statistics of one linear layer's input over calibration tokens."""

    name: str
    sq_sum: torch.Tensor
    """``[in]`` float64: Σ over tokens of ``x_j²``."""
    count: int = 0
    """Tokens seen."""
    xtx: torch.Tensor | None = None
    """``[in, in]``: Σ over tokens of ``x xᵀ`` (only when the Hessian was asked for)."""

    @property
    def col_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` over all calibration tokens, float64 ``[in]`` (Wanda's activation term)."""
        return self.sq_sum.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2 XᵀX / tokens`` (SparseGPT); float32 or float64 as collected."""
        if self.xtx is None:
            raise KernelError(f"layer {self.name}: the Hessian was not collected (collect with hessian=True)")
        return self.xtx * (2.0 / max(self.count, 1))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``[..., in]``) to the statistics."""
        x = x.detach().reshape(-1, x.shape[-1])
        self.count += int(x.shape[0])
        self.sq_sum += x.double().pow(2).sum(dim=0).to(self.sq_sum.device)
        if self.xtx is not None:
            xf = x.to(self.xtx.dtype)
            self.xtx.addmm_(xf.t(), xf)


class StatsCollector:
    """Forward hooks that feed each layer's input into a :class:`LayerStats` (a context manager).

    ``layers`` maps names to ``nn.Linear`` modules; ``hessian=True`` also accumulates ``XᵀX`` in
    ``dtype`` (float32 as the SparseGPT reference; float64 for small, ill-conditioned layers).
    """

    def __init__(
        self, layers: Mapping[str, nn.Module], *, hessian: bool = False, dtype: torch.dtype = torch.float32
    ) -> None:
        self.stats: dict[str, LayerStats] = {}
        self._handles: list[Any] = []
        for name, mod in layers.items():
            weight = getattr(mod, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise KernelError(f"layer {name} ({type(mod).__name__}) has no 2-D weight to collect statistics for")
            cols, dev = int(weight.shape[1]), weight.device
            st = LayerStats(
                name,
                torch.zeros(cols, dtype=torch.float64, device=dev),
                xtx=torch.zeros(cols, cols, dtype=dtype, device=dev) if hessian else None,
            )
            self.stats[name] = st
            self._handles.append(mod.register_forward_hook(self._hook(st)))

    @staticmethod
    def _hook(st: LayerStats) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if args and isinstance(args[0], torch.Tensor):
                st.update(args[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> StatsCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Linear]]:
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module) and hasattr(module, "lora_A"):
        # a peft tuner layer: prune the frozen base weight; lora_A/lora_B/dropout are not targets
        yield from _walk(base, f"{prefix}.base_layer" if prefix else "base_layer")
        return
    if isinstance(module, nn.Linear):
        yield prefix, module
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name)


def prunable_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` under ``module`` by qualified name; a peft LoRA layer gives its ``base_layer``.

    Example:
        >>> sorted(prunable_linears(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), "mlp"))
        ['mlp.0', 'mlp.1']
    """
    return dict(_walk(module, prefix))


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers the sparsity baselines prune, by name in ``model.named_modules()``.

    For a decoder LLM (blocks found by :func:`shear.model.blocks.decoder_blocks`), every linear
    inside its blocks; embeddings and ``lm_head`` are left dense, as in the Wanda/SparseGPT papers.
    Other models: every linear except the output embedding (``get_output_embeddings()``).
    """
    names = {id(m): n for n, m in model.named_modules()}
    if block_path(model) is None:
        out = prunable_linears(model)
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        return {n: m for n, m in out.items() if m is not head}
    found: dict[str, nn.Linear] = {}
    for block in decoder_blocks(model):
        found.update(prunable_linears(block, names[id(block)]))
    return found


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2 or ids.dtype != torch.long or ids.shape[0] == 0:
        raise DataError(f"calibration ids must be a non-empty [n, seq_len] long tensor, got {tuple(ids.shape)} {ids.dtype}")


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    ids: torch.Tensor,
    layers: Mapping[str, nn.Module] | None = None,
    *,
    hessian: bool = False,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LayerStats]:
    """Run ``model(input_ids=chunk)`` over ``ids`` ``[n, L]`` once; statistics of ``layers``' inputs.

    ``layers`` defaults to :func:`target_linears`. All layers see the dense model's activations
    (one forward pass per chunk); :func:`sequential_prune` is the block-by-block alternative.
    """
    _check_ids(ids)
    layers = target_linears(model) if layers is None else layers
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(layers, hessian=hessian, dtype=dtype) as col:
            for start in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    return col.stats


PruneLayer = Callable[[str, nn.Linear, LayerStats], None]
"""``prune(name, layer, stats)``: prune ``layer.weight`` in place from its input statistics."""


@torch.no_grad()
def sequential_prune(
    model: nn.Module,
    ids: torch.Tensor,
    prune: PruneLayer,
    *,
    hessian: bool = False,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    bar: ProgressBar | None = None,
) -> list[str]:
    """Prune the linears of a decoder LLM block by block on calibration ids ``[n, L]``.

    For each block: run it on its inputs with hooks on its linears (the layers of one block all
    see the block's input before any of them is pruned, as in the reference implementations),
    call ``prune(name, layer, stats)`` for each, then run the pruned block again to make the next
    block's inputs. ``bar`` advances once per layer. Returns the pruned layers' names in order.

    Raises :class:`~shear.errors.ModelError` when the model has no decoder blocks (see
    :data:`shear.model.blocks.BLOCK_PATHS`).
    """
    from shear.kernels.ebft import capture_block_inputs, run_block

    _check_ids(ids)
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()
    done: list[str] = []
    try:
        inputs = capture_block_inputs(model, ids, batch_size=batch_size, blocks=blocks)
        xs = inputs.hidden
        for i, block in enumerate(blocks):
            layers = prunable_linears(block, names[id(block)])
            with StatsCollector(layers, hessian=hessian, dtype=dtype) as col:
                for c, x in enumerate(xs):
                    run_block(block, x, inputs.args[i][c], inputs.kwargs[i][c])
            for name, layer in layers.items():
                prune(name, layer, col.stats[name])
                done.append(name)
                if bar is not None:
                    bar.advance()
            del col
            if i + 1 < len(blocks):
                xs = [run_block(block, x, inputs.args[i][c], inputs.kwargs[i][c]).detach() for c, x in enumerate(xs)]
    finally:
        model.train(was_training)
    return done
