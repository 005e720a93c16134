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

Timings are medians of ``--repeats`` runs; the load average is printed first because two-thread
OpenMP degrades badly when another process shares the cores.

Usage:
    python -m tools.bench_speed                       # full shape, ~2-4 minutes on 2 cores
    python -m tools.bench_speed --hidden 256 --layers 2 --repeats 2   # smoke
    python -m tools.bench_speed --device cuda --dtype bfloat16 --shape 7b --seq 512 --round-to 1 64 128
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.codegen.module_tree import codegen, plan_erasure
from shear.graph import trace
from shear.passes.baselines.random import zero_random
from tools.bench_common import load_average, median_time
from tools.bench_training_memory import LLAMA_SHAPES

__all__ = ["main"]


SHAPES = {k: v for k, v in LLAMA_SHAPES.items() if k in ("1b", "7b")}
"""Presets: LLaMA-3.2-1B and LLaMA-2-7B shapes (random weights; the head is untied here whatever ``tied`` says)."""


def _latencies(model: LlamaForCausalLM, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        ids = torch.randint(0, args.vocab, (batch, args.seq), generator=gen).to(args.device)
        with torch.no_grad():
            out[f"prefill b{batch}"] = median_time(lambda ids=ids: model(input_ids=ids, use_cache=False), args.repeats)
            short = ids[:, :8]
            total = median_time(
                lambda short=short: model.generate(short, attention_mask=torch.ones_like(short), pad_token_id=0,
                                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                   do_sample=False),
                args.repeats,
            )
            one = median_time(
                lambda short=short: model.generate(short, attention_mask=torch.ones_like(short), pad_token_id=0,
                                                   max_new_tokens=1, min_new_tokens=1, do_sample=False),
                args.repeats,
            )
            out[f"decode b{batch}"] = (total - one) / (args.new_tokens - 1)
    return out


def _prune(model: LlamaForCausalLM, target: float, round_to: int, example: torch.Tensor) -> LlamaForCausalLM:
    """Bisect the random ratio so the erased model has ~``target`` fewer parameters."""
    graph = trace(model, (example,))
    dense = sum(p.numel() for p in model.parameters())
    lo, hi = 0.0, 0.9
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        masked = copy.deepcopy(model)
        zero_random(masked, graph.pruning_groups, mid, seed=0, round_to=round_to)
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a preset shape (overrides the size options)")
    ap.add_argument("--targets", type=float, nargs="*", default=[0.2, 0.5], help="parameter reductions to time")
    args = ap.parse_args(argv)
    for k, v in SHAPES.get(args.shape or "", {}).items():
        setattr(args, k, v)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"load average {load_average():.2f}, {args.threads} threads, torch {torch.__version__}, {card}, {args.dtype}")
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
    rows = [("dense", 1, dense)]
    for round_to in args.round_to:
        for target in args.targets:
            rows.append((f"-{target:.0%} round_to={round_to}", round_to, _prune(dense, target, round_to, example)))
    n_dense = sum(p.numel() for p in dense.parameters())
    base = _latencies(dense, args)
    cols = list(base)
    print(f"\n{'model':<22}{'params':>12}{'ideal x':>9}" + "".join(f"{c + ' ms':>15}{'eff':>6}" for c in cols))
    table: list[dict[str, object]] = []
    for name, _r, model in rows:
        lat = base if model is dense else _latencies(model, args)
        n = sum(p.numel() for p in model.parameters())
        ideal = n_dense / n
        eff = {c: (base[c] / lat[c]) / ideal for c in cols}
        cells = "".join(f"{lat[c] * 1e3:>15.1f}{eff[c]:>6.2f}" for c in cols)
        print(f"{name:<22}{n:>12,}{ideal:>9.2f}{cells}")
        table.append({"name": name, "params": n, "ideal": ideal, "ms": lat, "eff": eff})
    return table


if __name__ == "__main__":
    main()
