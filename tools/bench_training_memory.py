"""Peak memory of LoRAShear on a LLaMA shape in bf16: where it goes, phase by phase; and loss modes.

Default: the **phases** table. Builds a LLaMA-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads,
SwiGLU 8192, vocab 128256, tied; ``--layers`` fewer to fit a small machine) with random weights
directly in ``--dtype`` (bf16: no fp32 copy is ever made), adds LoRA r=8 (adapters fp32), and runs,
each phase measured on its own (the allocator's free memory is trimmed and the high-water mark
reset in between):

* ``saliency``  — LHSPG's scorer (activation + taylor1) on calibration windows: the gradients of the
  frozen weights stay in their dtype and are upcast one tensor at a time;
* ``lhspg``     — warm-up and one period of LHSPG through the pass (saliency again at the period
  start, the per-step decay, the merge);
* ``erase``     — erase in place, verified in fp32 one block at a time;
* ``recovery``  — LoRA training steps on the erased model (what ``recover-dynamic`` runs).

``phase added MB`` is the phase's own high-water mark above the memory at its start: what the phase
itself allocates (gradients, activations, logits, temporaries), free of what earlier steps left
(the traced graph, the libraries loaded after the baseline).

Columns: peak (process high-water mark minus the memory before the model was built), peak /
weight bytes, and where it goes: weights, LoRA state (adapters + grads + AdamW moments, fp32), the
rest (activations, the loss, temporaries, allocator slack). On CUDA the peak is
``max_memory_allocated``.

The CPU allocator: by default (``--malloc fixed``) glibc's mmap threshold is fixed at 256 KiB, so
every tensor larger than that is its own mapping, returned to the OS when freed, and the peak RSS
follows the live tensor bytes as ``max_memory_allocated`` does on CUDA. With glibc's default
(``--malloc glibc``) the threshold grows to 32 MB as large blocks are freed, freed blocks below it
stay in the heap, and the RSS peak also measures heap fragmentation (0.1x to 0.4x the weights here).
To get the same behaviour in a CPU run of your own: ``MALLOC_MMAP_THRESHOLD_=262144``.

``--checkpointing`` sets ``gradient_checkpointing`` of LHSPG and recovery (default ``auto``: on when a
step's predicted activations exceed half the free memory); the note column says what it did.

``--modes``: the older table, full logits vs the chunked loss, with and without gradient checkpointing,
each in a fresh subprocess.

Usage:
    python -m tools.bench_training_memory                       # 1B shape, bf16, CPU (~3 min, 8 GB)
    python -m tools.bench_training_memory --layers 4            # smaller machine
    python -m tools.bench_training_memory --layers 4 --batch 4 --seq 512 --checkpointing on
    python -m tools.bench_training_memory --device cuda --batch 4 --seq 512
    python -m tools.bench_training_memory --modes --hidden 512 --layers 8 --vocab 32000 --dtype float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.training import (
    PeakMemory,
    TokenBatches,
    TrainConfig,
    ensure_lora,
    frozen_bytes,
    lora_state_bytes,
    tensor_bytes,
    train,
)
from shear.training.peak_memory import current_rss_bytes

__all__ = ["main", "measure", "measure_phases", "llama_shape"]

MB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


MODES = {
    "full logits": (False, None),
    "chunked loss": (False, 256),
    "full logits + GC": (True, None),
    "chunked loss + GC": (True, 256),
}
"""Mode name -> (gradient checkpointing, loss_chunk_tokens)."""


def measure(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Train once in this process and return the numbers of one table row."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    before = current_rss_bytes() if device.type == "cpu" else 0
    model, msg = ensure_lora(llama_shape(args), r=args.rank)
    checkpointing, chunk = MODES[mode]
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, bf16=args.bf16,
                       gradient_checkpointing=checkpointing, loss_chunk_tokens=chunk, log_every=args.steps)
    tokens = torch.randint(0, args.vocab, (args.batch * args.seq * 8,), generator=torch.Generator().manual_seed(0))
    with PeakMemory(device):  # clears the high-water mark before training
        result = train(model, TokenBatches.from_config({"random": tokens}, tcfg), tcfg)
    frozen = frozen_bytes(model)
    lora = lora_state_bytes(model)
    peak = result.memory.peak_bytes - before
    return {
        "mode": mode,
        "frozen_mb": frozen / MB, "lora_mb": lora / MB, "peak_mb": peak / MB,
        "ratio": peak / (frozen + lora), "tok_s": result.tokens_per_s, "method": result.memory.method,  # type: ignore[dict-item]
        "loss": result.losses[-1], "lora_msg": msg or "",  # type: ignore[dict-item]
    }


LLAMA_SHAPES: dict[str, dict[str, int | bool]] = {
    "smollm2": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, tied=False),
}
"""SmolLM2-135M, LLaMA-3.2-1B and LLaMA-2-7B shapes, for :func:`llama_shape` and the other benchmarks
(``tools.bench_step``, ``tools.bench_speed``, ``tests/gpu``), which build them with random weights."""


def llama_shape(args: argparse.Namespace) -> LlamaForCausalLM:
    """A LLaMA of ``args``' shape with random weights, built directly in ``args.dtype`` on ``args.device``."""
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=args.tied, use_cache=False,
    )
    dtype = getattr(torch, args.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)


def _trim() -> None:
    """Give freed memory back to the OS, so one phase's peak does not start from another's leftovers."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure_phases(args: argparse.Namespace) -> list[dict[str, float | str]]:
    """Run saliency, LHSPG, erase and recovery on a LLaMA shape; one row per phase."""
    from shear.codegen.module_tree import ErasureReport
    from shear.data import TextData
    from shear.graph import Graph
    from shear.kernels.saliency import parse_weights
    from shear.passes.base import Context
    from shear.passes.core.discover import DiscoverGroups
    from shear.passes.core.erase import Erase
    from shear.passes.lorashear.lhspg import (
        LHSPG,
        LhspgResult,
        eligible_groups,
        saliency_calibration,
        saliency_scorer,
    )
    from shear.passes.manager import PassManager

    torch.manual_seed(0)
    device = torch.device(args.device)
    before = current_rss_bytes() if device.type == "cpu" else 0
    model = llama_shape(args)
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    model, _ = ensure_lora(model, r=args.rank)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch * args.seq * 16,), generator=gen)
    data = TextData(tokenizer=None, train={"random": tokens}, validation={"random": tokens[: args.seq * 4]})
    ids = {"input_ids": torch.randint(0, args.vocab, (1, 16), generator=gen).to(device)}
    ctx = Context(model=model, example_inputs=ids, data=data, device=device)
    DiscoverGroups().run(ctx)
    checkpointing: bool | Literal["auto"] = "auto" if args.checkpointing == "auto" else args.checkpointing == "on"
    lhspg = LHSPG(ratio=0.2, warmup=1, periods=1, steps_per_period=args.steps, batch_size=args.batch,
                  seq_len=args.seq, calibration=args.calibration, lora_r=args.rank,
                  gradient_checkpointing=checkpointing)
    rows: list[dict[str, float | str]] = []

    def row(phase: str, meter: PeakMemory, lora: int, note: str) -> None:
        base = before if meter.stats.method != "cuda_max_allocated" else 0
        peak = meter.stats.peak_bytes - base
        w = frozen_bytes(ctx.model)
        rows.append({"phase": phase, "peak_mb": peak / MB, "ratio": peak / weights, "weights_mb": w / MB,
                     "lora_mb": lora / MB, "rest_mb": max(0, peak - w - lora) / MB,
                     "added_mb": meter.stats.added_bytes / MB, "note": note})
        print(f"{phase}: peak {peak / MB:.0f} MB = {peak / weights:.2f}x weights; {note}", file=sys.stderr, flush=True)

    graph = ctx.get(Graph)
    eligible, _ = eligible_groups(ctx, graph, lhspg.kinds, capped=False)
    w = parse_weights(lhspg.saliency)
    score = saliency_scorer(graph, eligible, w, saliency_calibration(data, args.calibration, args.seq, 0, w))
    _trim()
    with PeakMemory(device) as meter:
        score(ctx.model)
    row("saliency", meter, 0, f"{lhspg.saliency}, {args.calibration} x {args.seq} tokens")
    _trim()
    with PeakMemory(device) as meter:
        PassManager([lhspg]).run(ctx)  # adds LoRA (lora{r=rank}) and traces again first
    result = ctx.get(LhspgResult)
    row("lhspg", meter, lora_state_bytes(ctx.model),
        f"{lhspg.total_steps} steps, {result.train.tokens_per_s:.0f} tok/s, {_checkpointing(args, result.train)}")
    _trim()
    with PeakMemory(device) as meter:
        Erase().run(ctx)
    report = ctx.get(ErasureReport)
    row("erase", meter, 0, f"-{1 - report.params_after / report.params_before:.0%} params, max diff {report.max_diff:.2g}")
    _trim()
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq, log_every=args.steps,
                       gradient_checkpointing=checkpointing)
    with PeakMemory(device) as meter:
        trained = train(ctx.model, TokenBatches.from_config({"random": tokens}, tcfg), tcfg)
    row("recovery", meter, lora_state_bytes(ctx.model),
        f"{args.steps} steps, {trained.tokens_per_s:.0f} tok/s, {_checkpointing(args, trained)}")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") + (" lora" if "lora_" in n else " frozen")
                     for n, p in ctx.model.named_parameters()})
    rows.append({"phase": "_meta", "weights_mb": weights / MB, "method": meter.stats.method, "dtypes": ", ".join(dtypes)})
    return rows


def _checkpointing(args: argparse.Namespace, trained: Any) -> str:
    if args.checkpointing != "auto":
        return f"checkpointing {args.checkpointing}"
    on = any(w.startswith("gradient checkpointing is on") for w in trained.warnings)
    return f"checkpointing auto: {'on' if on else 'off'}"


def _fix_mmap_threshold() -> bool:
    """glibc: serve every allocation above 256 KiB from its own mapping (see the module doc)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 256 << 10))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _print_phases(args: argparse.Namespace, rows: list[dict[str, float | str]]) -> None:
    meta = rows[-1]
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads or args.heads} heads, "
          f"vocab {args.vocab}, {args.dtype} on {args.device} ({meta['method']}, malloc {args.malloc}), LoRA r={args.rank}, "
          f"batch {args.batch} x {args.seq}; weights {float(meta['weights_mb']):.0f} MB; after: {meta['dtypes']}")
    print(f"| {'phase':<9} | {'peak MB':>8} | {'peak / weights':>14} | {'weights MB':>10} | {'LoRA state MB':>13} "
          f"| {'rest MB':>8} | {'phase added MB':>14} | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows[:-1]:
        print(f"| {r['phase']:<9} | {float(r['peak_mb']):>8.0f} | {float(r['ratio']):>14.2f} | {float(r['weights_mb']):>10.0f} "
              f"| {float(r['lora_mb']):>13.1f} | {float(r['rest_mb']):>8.0f} | {float(r['added_mb']):>14.0f} | {r['note']} |")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--calibration", type=int, default=2, help="calibration windows of the saliency phase")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: auto, only on CUDA with bf16)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="gradient checkpointing of LHSPG and recovery")
    p.add_argument("--malloc", choices=["fixed", "glibc"], default="fixed",
                   help="CPU: fix glibc's mmap threshold at 256 KiB (RSS follows live tensors) or keep glibc's default")
    p.add_argument("--modes", action="store_true", help="the loss-mode table instead of the phases")
    p.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Print the phases table (or, with ``--modes``, run every mode in a subprocess); returns its rows."""
    args = _parser().parse_args(argv)
    if args.device == "cpu" and args.malloc == "fixed" and not _fix_mmap_threshold():
        args.malloc = "glibc (could not fix the mmap threshold)"
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return []
    if not args.modes:
        rows = measure_phases(args)
        _print_phases(args, rows)
        return rows  # type: ignore[return-value]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, "-m", "tools.bench_training_memory", *passthrough, "--one", mode],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype}, LoRA r={args.rank}, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps on {args.device} ({rows[0]['method']}); "
          f"{rows[0]['lora_msg']}")
    print(f"| {'mode':<18} | {'frozen MB':>10} | {'LoRA state MB':>14} | {'peak MB':>9} | {'ratio':>7} | {'tok/s':>8} | {'loss':>8} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']:<18} | {r['frozen_mb']:>10.1f} |  {r['lora_mb']:>14.2f} | {r['peak_mb']:>9.1f} | "
              f"{r['ratio']:>7.2f} | {r['tok_s']:>8.0f} | {r['loss']:>8.4f} |")
    return rows


if __name__ == "__main__":
    main()
