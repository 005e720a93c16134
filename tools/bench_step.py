"""Training-step throughput: a plain torch + peft LoRA loop next to shear's LHSPG and recovery steps.

Side by side in one process, on copies of the same model, with the same batch, dtype, LoRA (r=8 on
every block Linear) and gradient checkpointing setting:

* ``plain peft``   — written here with no shear code: ``get_peft_model``, ``model(input_ids,
  labels=...)``, ``loss.backward()``, grad-norm clip 1.0, ``AdamW.step()``, ``zero_grad``;
* ``shear lhspg``  — :func:`shear.training.train` with LHSPG's hook inside a period (every
  step decays the period's redundant structures with the half-space projection and holds the earlier
  ones at zero);
* ``shear recovery`` — the same loop without a hook (LoRA training of the pruned model, as
  ``recover-dynamic`` runs it).

The three alternate, ``--reps`` times ``--steps`` steps each, so a neighbour's load hits them
alike; the table reports median tokens/s and the ratio to the plain loop (goal >= 0.8). Below the
goal (or with ``--profile``) a torch profiler table of one LHSPG step says where the time goes.

Usage:
    python -m tools.bench_step                     # SmolLM2-135M if installed, else the tiny LLaMA
    python -m tools.bench_step --model tiny --batch 4 --seq 128
    python -m tools.bench_step --device cuda --dtype bfloat16 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shear.training import TrainHook
from tools.bench_common import sync
from tools.bench_training_memory import LLAMA_SHAPES, llama_shape

__all__ = ["main", "plain_peft_step", "load_model", "run"]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


SHAPES = {f"{k}-shape": LLAMA_SHAPES[k] for k in ("smollm2", "1b")}
"""LLaMA shapes with random weights (step time does not depend on the values): SmolLM2-135M's and
LLaMA-3.2-1B's, for a machine without the SmolLM2 package."""


def load_model(name: str, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, str]:
    """``(model, label)``: SmolLM2-135M (``smollm2``, or ``auto`` when installed), the tiny LLaMA, or a
    random-weight shape of :data:`SHAPES`."""
    from shear.errors import ModelLoadError
    from shear.zoo import load_tiny_llama

    if name in SHAPES:
        from types import SimpleNamespace

        shape = SimpleNamespace(**SHAPES[name], dtype=str(dtype).removeprefix("torch."), device=str(device), seq=512)
        return llama_shape(shape), f"{name} (random weights)"

    if name in ("auto", "smollm2"):
        try:
            from shear.zoo import load_smollm2

            return load_smollm2(dtype=dtype)[0].to(device), "SmolLM2-135M"
        except ModelLoadError:
            if name == "smollm2":
                raise
    return load_tiny_llama()[0].to(device=device, dtype=dtype), "tiny LLaMA"


def plain_peft_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One plain LoRA training step: HF loss on ``labels``, backward, clip, AdamW. Returns the loss."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _plain(base: nn.Module, args: argparse.Namespace, batches: list[torch.Tensor]) -> Callable[[], float]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    device = torch.device(args.device)

    def run_steps() -> float:
        plain_peft_step(model, optimizer, batches[0])  # warm
        sync(device)
        t0 = time.perf_counter()
        for ids in batches[: args.steps]:
            plain_peft_step(model, optimizer, ids)
        sync(device)
        return args.steps * ids.numel() / (time.perf_counter() - t0)

    return run_steps


class _Clock(TrainHook):
    """A training hook that notes the time after every step (after the hooks before it ran)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def after_optimizer_step(self, state: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())


def _shear(base: nn.Module, args: argparse.Namespace, tokens: torch.Tensor, lhspg: bool) -> tuple[Callable[[], float], Any]:
    from shear.graph.trace import trace
    from shear.kernels.allocation import ParamBudget
    from shear.kernels.lhspg import StructureViews
    from shear.passes.lorashear.lhspg import LhspgHook
    from shear.training import TokenBatches, TrainConfig, ensure_lora, train

    model, _ = ensure_lora(copy.deepcopy(base), r=8)
    hooks: list[Any] = []
    if lhspg:
        graph = trace(model, {"input_ids": tokens[:16].view(1, 16).to(args.device)})
        groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
        views = StructureViews(model, groups, graph.composites)
        scores = {g.id: views.norms(g.id) for g in groups}
        counts = ParamBudget(model, groups).counts(0.5, scores)
        # one long period: every step decays half of the final count (periods=2) and projects
        hook = LhspgHook(views, {g: n for g, n in counts.items() if n}, warmup=0, periods=2,
                         steps_per_period=10**6, eps=0.0, score=lambda m: scores, initial_scores=scores)
        hooks.append(hook)
    config = TrainConfig(steps=args.steps + 1, batch_size=args.batch, seq_len=args.seq, lr=2e-4,
                         gradient_checkpointing=args.checkpointing, log_every=10**6)
    clock = _Clock(torch.device(args.device))

    def run_steps() -> float:
        clock.times.clear()
        batches = TokenBatches({"random": tokens}, args.batch, args.seq, seed=0)
        train(model, batches, config, hooks=[*hooks, clock])
        # from the end of the first (warm) step to the end of the last, LHSPG's hook included
        return args.steps * args.batch * args.seq / (clock.times[-1] - clock.times[0])

    return run_steps, (model, hooks, config, tokens)


def _profile(setup: Any, args: argparse.Namespace) -> str:
    from torch.profiler import ProfilerActivity, profile

    from shear.training import TokenBatches, TrainConfig, train

    model, hooks, _, tokens = setup
    config = TrainConfig(steps=2, batch_size=args.batch, seq_len=args.seq, lr=2e-4,
                         gradient_checkpointing=args.checkpointing, log_every=10**6)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        train(model, TokenBatches({"random": tokens}, args.batch, args.seq, seed=0), config, hooks=hooks)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=18)


def run(args: argparse.Namespace) -> list[dict[str, float | str]]:
    """Measure the three loops; one row each (``name``, ``tok_s`` median, ``ratio`` to plain)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    base, label = load_model(args.model, dtype, device)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch * args.seq * (args.steps + 2) * 2,), generator=gen)
    batches = [t.view(args.batch, args.seq).to(device) for t in tokens[: (args.steps + 1) * args.batch * args.seq]
               .split(args.batch * args.seq)]
    loops: dict[str, Callable[[], float]] = {"plain peft": _plain(base, args, batches)}
    loops["shear lhspg"], lhspg_setup = _shear(base, args, tokens, lhspg=True)
    loops["shear recovery"], _ = _shear(base, args, tokens, lhspg=False)
    samples: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(args.reps):
        for name, fn in loops.items():
            samples[name].append(fn())
    plain = statistics.median(samples["plain peft"])
    rows: list[dict[str, float | str]] = []
    for name, values in samples.items():
        med = statistics.median(values)
        rows.append({"name": name, "tok_s": med, "ratio": med / plain, "min": min(values), "max": max(values)})
    print(f"{label} in {args.dtype} on {args.device}, batch {args.batch} x {args.seq}, LoRA r=8, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {args.reps} reps x {args.steps} steps "
          f"(median; torch threads {torch.get_num_threads()})")
    print(f"| {'loop':<15} | {'tokens/s':>9} | {'min':>8} | {'max':>8} | {'vs plain':>8} |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']:<15} | {float(r['tok_s']):>9.0f} | {float(r['min']):>8.0f} | {float(r['max']):>8.0f} "
              f"| {float(r['ratio']):>7.2f}x |")
    worst = min(float(r["ratio"]) for r in rows[1:])
    if args.profile or worst < 0.8:
        print(f"\nshear's slowest loop runs at {worst:.2f}x the plain one (goal 0.8x); where one LHSPG run of 2 steps spends its time:")
        print(_profile(lhspg_setup, args))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="auto", choices=["auto", "smollm2", "tiny", *SHAPES])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--profile", action="store_true", help="print the profiler table even when the goal is met")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    """Parse ``argv``, run the three loops and print the table."""
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    main()
