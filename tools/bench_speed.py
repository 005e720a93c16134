"""Dense vs pruned LLaMA latency on CPU: does erasure deliver the speed its parameter count promises?

For a LLaMA shape that fits in CPU memory (default hidden 1024, 8 layers, 16 query / 4 kv heads,
intermediate 2816), prune uniformly at random (``random`` pass over every prunable group: MLP
channels, kv-head families, residual width) to about 20% and 50% fewer parameters, erase, and time
prefill (batch 1 and 8) and per-token decode with a KV cache (batch 1 and 8). Efficiency =
(dense latency / pruned latency) / (dense params / pruned params): 1.0 is ideal, the goal is >= 0.9.
``--round-to 8`` keeps every pruned width a multiple of 8 (64 / 128 for tensor cores; k-quants
pack rows in 256s). ``--device cuda --dtype bfloat16 --shape 1b`` (or ``7b``) times a LLaMA-3.2-1B
or LLaMA-2-7B shape with random weights built directly in that dtype on that device; CUDA timings
synchronise the device.

Besides the ``--round-to`` rows, each ``--target`` (default ``auto``, as ``shear prune`` uses) adds
rows pruned with that target's width steps (:mod:`shear.model.target`: the device's measured
granularity, the format's k-quant / ``ffn_mult`` blocks), so the default's price and the explicit
roundings are timed side by side in one process. ``--static`` adds the decode columns of a
transformers ``StaticCache`` with ``torch.compile`` (compiling costs tens of seconds per model and
batch size).

The measurements are shear's own (:mod:`shear.evaluation.throughput`, what ``shear bench`` and the
run's speed section time): prefill builds the KV cache and keeps the last logits; decode is
``generate`` with the dynamic cache, timed from the first new token to the last. Timings are medians
of ``--repeats`` runs; the load average is printed first because two-thread OpenMP degrades badly
when another process shares the cores.

Usage:
    python -m tools.bench_speed                       # full shape, ~2-4 minutes on 2 cores
    python -m tools.bench_speed --hidden 256 --layers 2 --repeats 2   # smoke
    python -m tools.bench_speed --static --target auto cpu gguf       # + compiled static-cache decode
    python -m tools.bench_speed --device cuda --dtype bfloat16 --shape 7b --seq 512 --round-to 1 64 128
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.codegen.module_tree import codegen, plan_erasure
from shear.evaluation.throughput import speed_probes
from shear.graph import trace
from shear.io.targets import target_for
from shear.kernels.widths import device_name
from shear.model.target import Target, round_steps
from shear.passes.baselines.random import zero_random
from tools.bench_common import load_average
from tools.bench_training_memory import LLAMA_SHAPES

__all__ = ["main"]


SHAPES = {k: v for k, v in LLAMA_SHAPES.items() if k in ("1b", "7b")}
"""Presets: LLaMA-3.2-1B and LLaMA-2-7B shapes (random weights; the head is untied here whatever ``tied`` says)."""


def _latencies(model: LlamaForCausalLM, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per column: a whole prefill (``prefill bN``), one decode step (``decode bN``, and
    ``decode bN static`` with ``--static``); NaN where a measurement could not run (printed)."""
    probes = speed_probes(model, torch.device(args.device), batches=(1, 8), prompt_tokens=args.seq,
                          new_tokens=args.new_tokens, repeats=args.repeats, mode="both" if args.static else "eager")
    out: dict[str, float] = {}
    for p in probes:
        rate = p.measure()
        batch = int(p.name.split()[1][1:])
        if isinstance(rate, str):
            print(f"  {p.name}: {rate}")
            out[p.name] = float("nan")
        else:  # tokens/s -> seconds per prefill (batch x seq tokens) or per decode step (batch tokens)
            out[p.name] = batch * (args.seq if p.name.startswith("prefill") else 1) / rate
    return out


def _prune(model: LlamaForCausalLM, target: float, round_to: int | Target, example: torch.Tensor) -> LlamaForCausalLM:
    """Bisect the random ratio so the erased model has ~``target`` fewer parameters; ``round_to`` is a
    width step, or a resolved target whose steps are used (as ``shear prune --target`` rounds)."""
    graph = trace(model, (example,))
    steps: int | Mapping[int, int] = round_to if isinstance(round_to, int) else round_steps(round_to, graph.pruning_groups, 0)
    dense = sum(p.numel() for p in model.parameters())
    lo, hi = 0.0, 0.9
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        masked = copy.deepcopy(model)
        zero_random(masked, graph.pruning_groups, mid, seed=0, round_to=steps)
        got = 1 - plan_erasure(masked, graph.pruning_groups).numel() / dense
        best = (mid, masked)
        if abs(got - target) < 0.01:
            break
        lo, hi = (mid, hi) if got < target else (lo, mid)
    assert best is not None
    small, report = codegen(best[1], graph.pruning_groups, example_inputs=(example,), inplace=True)
    print(f"  {target:.0%} target: ratio {best[0]:.3f}, {report.summary()}")
    return small


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Build the shape, prune it to each target, print the latency table and return its rows: ``name``,
    ``params``, ``ideal`` (dense / pruned params) and per column (``prefill b1``, ``decode b8``, ...)
    the latency in seconds under ``ms`` and the efficiency under ``eff``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--round-to", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--target", nargs="*", default=["auto"], metavar="SPEC",
                    help="rows pruned with each target's width steps (shear's --target words, e.g. auto, cpu, gguf,cpu); "
                    "none: only the --round-to rows")
    ap.add_argument("--static", action="store_true", help="add decode columns with a StaticCache and torch.compile")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a preset shape (overrides the size options)")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.2, 0.5], help="parameter reductions to time")
    args = ap.parse_args(argv)
    for k, v in SHAPES.get(args.shape or "", {}).items():
        setattr(args, k, v)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"load average {load_average():.2f}, torch {torch.__version__}, {device_name(device)}, {args.dtype}")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                      vocab_size=args.vocab, max_position_embeddings=max(512, args.seq + args.new_tokens + 8),
                      head_dim=args.hidden // args.heads)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))  # built in its dtype: no fp32 copy of a 7B
    try:
        with device:
            dense = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    example = torch.randint(0, args.vocab, (1, 16)).to(device)
    rows: list[tuple[str, LlamaForCausalLM]] = [("dense", dense)]
    resolved = [target_for(spec, dense, device=args.device) for spec in args.target]  # once: a sweep may run
    for t, spec in zip(resolved, args.target):
        print(f"--target {spec}: {t.describe()}")
    for round_to in [*args.round_to, *resolved]:
        label = f"round_to={round_to}" if isinstance(round_to, int) else f"target {round_to.spec}"
        for target in args.targets:
            rows.append((f"-{target:.0%} {label}", _prune(dense, target, round_to, example)))
    n_dense = sum(p.numel() for p in dense.parameters())
    base = _latencies(dense, args)
    cols = list(base)
    width = {c: 22 if "static" in c else 15 for c in cols}
    print(f"\n{'model':<26}{'params':>12}{'ideal x':>9}" + "".join(f"{c + ' ms':>{width[c]}}{'eff':>6}" for c in cols))
    table: list[dict[str, object]] = []
    for name, model in rows:
        lat = base if model is dense else _latencies(model, args)
        n = sum(p.numel() for p in model.parameters())
        ideal = n_dense / n
        eff = {c: (base[c] / lat[c]) / ideal for c in cols}
        cells = "".join(f"{lat[c] * 1e3:>{width[c]}.1f}{eff[c]:>6.2f}" for c in cols)
        print(f"{name:<26}{n:>12,}{ideal:>9.2f}{cells}")
        table.append({"name": name, "params": n, "ideal": ideal, "ms": lat, "eff": eff})
    return table


if __name__ == "__main__":
    main()
