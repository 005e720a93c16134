"""LHSPG (without recovery) vs one-shot magnitude pruning vs dense, side by side, in one run.

On the reference trained LLaMA (SmolLM2-135M; ``--quick`` uses shear's tiny trained LLaMA) and at
each ``--ratios`` share of parameters removed, it runs

* **dense**: the model as loaded;
* **magnitude (one-shot)**: the same per-group structure counts as LHSPG's parameter budget, the
  structures with the smallest L2 norm zeroed at once, erased, no training;
* **LHSPG**: ``lora -> discover-groups -> [knowledge-distribution ->] lhspg -> erase -> merge-lora``
  through ``shear.compile`` (the LoRAShear pipeline without recovery),

and prints one table: parameters, perplexity per corpus source on held-out validation text
(non-overlapping windows of ``--seq-len`` tokens), their mean, wall time and peak memory (peak RSS
above the start of each method, Linux VmHWM). The table is also written as Markdown to ``--out``.

Usage:
    python -m tools.bench_lorashear --quick                       # tiny LLaMA, ~2 min
    python -m tools.bench_lorashear                               # SmolLM2 at 20% and 50%
    python -m tools.bench_lorashear --ratios 0.2 --kd             # with knowledge distribution
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from shear.kernels.allocation import base_param_count
from tools.bench_common import load_average, markdown_table, mean, measured

__all__ = ["main"]



def _one_shot_magnitude(model: torch.nn.Module, ratio: float, args: argparse.Namespace) -> torch.nn.Module:
    import shear
    from shear.graph.trace import trace
    from shear.kernels.allocation import zero_to_budget
    from shear.kernels.lhspg import StructureViews

    model = copy.deepcopy(model)
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    graph = trace(model, ids)
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    views = StructureViews(model, groups)
    scores = {g.id: views.norms(g.id) for g in groups}
    zero_to_budget(model, groups, scores, ratio, selection=args.selection)
    return shear.compile(model, "erase", example_inputs=ids, inplace=True, verify=args.verify_tol)


def _lhspg(model: torch.nn.Module, ratio: float, data: Any, args: argparse.Namespace) -> torch.nn.Module:
    import shear

    kd = f"knowledge-distribution{{ratio=0.5,gamma={args.gamma},max_windows=1}}," if args.kd else ""
    pipeline = (
        f"lora{{r={args.lora_r}}},discover-groups,{kd}"
        f"lhspg{{ratio={ratio},periods={args.periods},steps_per_period={args.steps_per_period},"
        f"warmup={args.warmup},lr={args.lr},batch_size={args.batch},seq_len={args.seq_len},"
        f"selection={args.selection},saliency=\"{args.saliency}\"}},erase,merge-lora"
    )
    ids = {"input_ids": torch.arange(16).view(1, 16)}
    return shear.compile(model, pipeline, example_inputs=ids, data=data, verify=args.verify_tol)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny trained LLaMA, few steps")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--periods", type=int, default=None)
    parser.add_argument("--steps-per-period", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--selection", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--saliency", default="activation=1,taylor1=1")
    parser.add_argument("--kd", action="store_true", help="run knowledge-distribution before lhspg")
    parser.add_argument("--gamma", type=float, default=0.1, help="share of node groups KD keeps unprunable")
    parser.add_argument("--eval-windows", type=int, default=None, help="validation windows per source")
    parser.add_argument("--verify-tol", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_lorashear.md"))
    args = parser.parse_args(argv)
    q = args.quick
    args.periods = args.periods or (3 if q else 4)
    args.steps_per_period = args.steps_per_period or (10 if q else 15)
    args.warmup = args.warmup if args.warmup is not None else (5 if q else 10)
    args.lr = args.lr or (2e-3 if q else 5e-4)
    args.seq_len = args.seq_len or (128 if q else 256)
    if args.eval_windows is None:
        args.eval_windows = 8 if q else 12
    if args.threads:
        torch.set_num_threads(args.threads)

    from shear.data import TextData
    from shear.zoo import load_smollm2, load_tiny_llama

    loaded = load_tiny_llama() if q else load_smollm2()
    model, tokenizer = loaded.model, loaded.tokenizer
    data = TextData.from_corpus(tokenizer, max_train_chars=200_000 if q else 400_000)
    sources = list(data.validation)
    load = load_average()
    print(f"model {loaded.name}: {base_param_count(model):,} parameters; load average {load:.2f}; threads {torch.get_num_threads()}")

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        return data.perplexity(m, seq_len=args.seq_len, max_windows=args.eval_windows)

    rows: list[dict[str, Any]] = []
    dense = measured(evaluate, model)
    rows.append({"method": "dense", "ratio": 0.0, "params": base_param_count(model), "ppl": dense.value, "wall_s": 0.0, "peak_mb": 0.0})
    print(f"dense evaluated in {dense.seconds:.0f}s")
    for ratio in args.ratios:
        run = measured(_one_shot_magnitude, model, ratio, args)
        rows.append({"method": "magnitude (one-shot)", "ratio": ratio, "params": base_param_count(run.value),
                     "ppl": evaluate(run.value), "wall_s": run.seconds, "peak_mb": run.added_bytes / 2**20})
        print(_row_text(rows[-1], sources), flush=True)
        run = measured(_lhspg, model, ratio, data, args)
        rows.append({"method": "LHSPG (no recovery)", "ratio": ratio, "params": base_param_count(run.value),
                     "ppl": evaluate(run.value), "wall_s": run.seconds, "peak_mb": run.added_bytes / 2**20,
                     "steps": args.warmup + args.periods * args.steps_per_period})
        print(_row_text(rows[-1], sources), flush=True)
    table = _table(rows, sources, loaded.name, args, load)
    print(table)
    args.out.write_text(table + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


def _row_text(r: dict[str, Any], sources: list[str]) -> str:
    return f"{r['method']} @ {r['ratio']:.0%}: mean ppl {mean(r['ppl']):.2f}, {r['wall_s']:.0f}s"


def _table(rows: list[dict[str, Any]], sources: list[str], name: str, args: argparse.Namespace, load: float) -> str:
    head = ["method", "removed", "params"] + sources + ["mean ppl", "wall s", "peak MB"]
    lines = [
        f"### LHSPG vs one-shot magnitude on {name}",
        "",
        f"Perplexity on held-out validation text ({args.eval_windows} windows x {args.seq_len} tokens per source). "
        f"LHSPG: {args.warmup} warm-up + {args.periods} x {args.steps_per_period} steps, batch {args.batch}, "
        f"lr {args.lr}, LoRA r {args.lora_r}, selection {args.selection}, saliency {args.saliency}"
        f"{', knowledge distribution gamma ' + str(args.gamma) if args.kd else ''}. Load average at start {load:.2f}.",
        "",
    ]
    base = rows[0]["params"]
    cells = []
    for r in rows:
        row = [r["method"], f"{1 - r['params'] / base:.1%}", f"{r['params']:,}"]
        row += [f"{r['ppl'][s]:.2f}" for s in sources]
        row += [f"{mean(r['ppl']):.2f}", f"{r['wall_s']:.0f}", f"{r['peak_mb']:.0f}"]
        cells.append(row)
    return "\n".join(lines) + "\n" + markdown_table(head, cells)


if __name__ == "__main__":
    main()
