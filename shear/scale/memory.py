"""Memory each stage of a prune will need: formulas over the model's shapes, not measurements.

Every number here is a *prediction* from byte counts; each :class:`MemoryLine` carries its formula
so a reader can check it. Symbols: ``P`` parameters (``P'`` after pruning), ``e`` bytes per weight
(2 in bf16), ``W`` GPUs (FSDP world size), ``L`` blocks, ``P_blk`` parameters of the largest block,
``P_lora`` LoRA parameters (rank ``r`` on every block Linear: ``r * (in + out)`` each), ``b`` micro-batch,
``s`` sequence length, ``h`` hidden size, ``q``/``kv`` query/key-value widths, ``f`` MLP width,
``V`` vocabulary, ``c`` loss chunk tokens, ``T`` bytes of the largest tensor.

LHSPG per GPU under FSDP (full sharding of frozen weights and LoRA, bf16 compute, gradient
checkpointing per block, chunked loss):

* frozen weights, sharded: ``e * P / W``;
* the all-gathered block being computed plus the prefetched next one: ``2 * e * P_blk``;
* LoRA state, sharded: ``16 * P_lora / W`` (fp32 adapter, fp32 gradient, AdamW's two fp32 moments);
* checkpointed block inputs: ``L * b * s * h * e``;
* one block's recomputed activations and their gradients: ``2 * b * s * (4h + q + 2kv + 4f) * e``
  (norm in/out, q/k/v, attention and o_proj outputs; gate, up, act(gate), product), attention by a
  memory-efficient SDPA kernel (no ``s^2`` term);
* the loss: ``2 * c * V * 4`` (fp32 logits of one chunk and their gradient) + ``b * s * h * e``.

Not included: the CUDA context and allocator fragmentation (typically 1-3 GB), a distillation
teacher (another ``e * P / W``), communication buckets.

Streamed stages (host RAM, :mod:`shear.scale.stream`): saliency (magnitude) holds one tensor plus
float64 work on chunks of at most ``CHUNK_ELEMENTS`` elements: ``T + 24 * CHUNK_ELEMENTS``; erase
holds one source tensor, its slice along one dim and the result: ``3 * T``. Each adds the
interpreter with torch and the stamped groups (``BASE_BYTES``). Export to GGUF in memory holds the
pruned model: ``e * P' + T``.

Example:
    >>> lines = lhspg_memory(ModelShape(params=10**9, block_params=5 * 10**7, blocks=16, hidden=2048, q=2048,
    ...                                 kv=512, ffn=8192, vocab=32000, lora_params=10**7, max_tensor_bytes=2**27),
    ...                      Training(world_size=8, batch=1, seq_len=2048))
    >>> [x.name for x in lines][:2]
    ['frozen weights (sharded)', 'gathered blocks']
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ModelShape", "Training", "MemoryLine", "lhspg_memory", "streamed_memory", "CHUNK_ELEMENTS", "BASE_BYTES",
    "format_bytes",
]

CHUNK_ELEMENTS = 1 << 24
"""Elements of a tensor slab the streamed saliency reduces at once (float64 work: 3 copies)."""
BASE_BYTES = 600 * 2**20
"""Resident memory of the interpreter with torch and transformers loaded (an upper bound of what
``tools/bench_streaming.py`` measures)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formulas read."""

    params: int
    block_params: int
    blocks: int
    hidden: int
    q: int
    kv: int
    ffn: int
    vocab: int
    lora_params: int
    max_tensor_bytes: int
    weight_bytes: int = 2
    """Bytes per frozen weight element (2: bf16)."""


@dataclass(frozen=True)
class Training:
    """The LHSPG run the memory is predicted for."""

    world_size: int = 8
    batch: int = 1
    seq_len: int = 2048
    lora_r: int = 8
    loss_chunk_tokens: int = 256


@dataclass(frozen=True)
class MemoryLine:
    """One term of a prediction: bytes and the formula with its values."""

    name: str
    bytes: int
    formula: str


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style text.

    Example:
        >>> format_bytes(3 * 2**30), format_bytes(5 * 2**20)
        ('3.00 GiB', '5.0 MiB')
    """
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def lhspg_memory(m: ModelShape, t: Training) -> list[MemoryLine]:
    """Per-GPU bytes of an LHSPG step under FSDP, term by term (see the module doc)."""
    e, w = m.weight_bytes, t.world_size
    act = 2 * t.batch * t.seq_len * (4 * m.hidden + m.q + 2 * m.kv + 4 * m.ffn) * e
    return [
        MemoryLine("frozen weights (sharded)", e * m.params // w, f"e*P/W = {e}*{m.params:,}/{w}"),
        MemoryLine("gathered blocks", 2 * e * m.block_params, f"2*e*P_blk = 2*{e}*{m.block_params:,}"),
        MemoryLine("LoRA + AdamW state (sharded)", 16 * m.lora_params // w, f"16*P_lora/W = 16*{m.lora_params:,}/{w}"),
        MemoryLine(
            "checkpointed block inputs", m.blocks * t.batch * t.seq_len * m.hidden * e,
            f"L*b*s*h*e = {m.blocks}*{t.batch}*{t.seq_len}*{m.hidden}*{e}",
        ),
        MemoryLine("one block recomputed (+grads)", act, f"2*b*s*(4h+q+2kv+4f)*e, h={m.hidden} q={m.q} kv={m.kv} f={m.ffn}"),
        MemoryLine(
            "loss chunk (fp32 logits + grad)", 2 * t.loss_chunk_tokens * m.vocab * 4 + t.batch * t.seq_len * m.hidden * e,
            f"2*c*V*4 + b*s*h*e, c={t.loss_chunk_tokens} V={m.vocab}",
        ),
    ]


def streamed_memory(m: ModelShape, params_after: int, max_tensor_after: int) -> list[MemoryLine]:
    """Host bytes of the streamed saliency and erase, and of a GGUF export of the pruned model."""
    big = m.max_tensor_bytes
    return [
        MemoryLine("saliency (magnitude, streamed)", BASE_BYTES + big + 24 * CHUNK_ELEMENTS,
                   f"base + T + 24*chunk, T={format_bytes(big)}"),
        MemoryLine("erase (streamed)", BASE_BYTES + 3 * big, f"base + 3*T, T={format_bytes(big)}"),
        MemoryLine("export (GGUF, in memory)", BASE_BYTES + m.weight_bytes * params_after + max_tensor_after,
                   f"base + e*P' + T', P'={params_after:,}"),
    ]
