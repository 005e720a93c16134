"""Depth against width at one share of parameters: block removal, whole layers, and the joint budget.

On SmolLM2-135M (``--quick``: shear's tiny trained LLaMA), at ``--ratio`` of the parameters, short
runs of:

* **block-drop** and **block-drop (layers)**: one-shot depth pruning by the loss increase when a
  block is skipped, erased, no training;
* **LHSPG width** (``kinds=[channel]``), **LHSPG depth** (``kinds=[block]``) and **LHSPG joint**
  (``kinds=[channel,block]``: one budget, the depth/width split measured), each with the same LHSPG
  steps and tokens, erased, adapters merged (no recovery stage).

Columns: parameters, layers left, blocks erased, held-out perplexity per corpus source (validation
windows) and their mean, wall time of the method. Written as Markdown to ``--out`` and printed.

Usage:
    OMP_NUM_THREADS=1 python -m tools.bench_depth --quick             # tiny LLaMA: a few minutes
    OMP_NUM_THREADS=1 python -m tools.bench_depth --ratio 0.2 --out depth.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from shear.kernels.allocation import base_param_count
from tools.bench_common import load_average, markdown_table, mean

__all__ = ["main", "ROWS"]

ROWS: dict[str, str] = {
    "block-drop": "discover-groups,block-drop{{ratio={r},samples={n},seq_len=128}},erase",
    "block-drop (layers)": "discover-groups,block-drop{{ratio={r},layers=true,samples={n},seq_len=128}},erase",
    "LHSPG width": "discover-groups,lhspg{{ratio={r},kinds=[channel],{steps}}},erase,merge-lora",
    "LHSPG depth": "discover-groups,lhspg{{ratio={r},kinds=[block],{steps}}},erase,merge-lora",
    "LHSPG joint": "discover-groups,lhspg{{ratio={r},kinds=[channel,block],{steps}}},erase,merge-lora",
}
"""Row name -> pipeline (``{r}``: the ratio, ``{n}``: calibration windows, ``{steps}``: LHSPG's step options)."""


def _perplexity(model: torch.nn.Module, data: object, max_tokens: int) -> dict[str, float]:
    from shear.evaluation.perplexity import perplexity_ids

    model.eval()
    return {
        name: perplexity_ids(model, ids, name=name, window=256, stride=256, max_tokens=max_tokens).ppl
        for name, ids in data.validation.items()  # type: ignore[attr-defined]
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shear's tiny trained LLaMA instead of SmolLM2-135M")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--steps", default="periods=2,steps_per_period=5,batch_size=2,seq_len=128,calibration=2",
                   help="LHSPG's step options (its calibration windows also score the blocks)")
    p.add_argument("--calibration", type=int, default=2, help="block-drop's calibration windows of 128 tokens")
    p.add_argument("--eval-tokens", type=int, default=2048, help="validation tokens per source")
    p.add_argument("--only", nargs="*", default=None, help="row names to run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from shear.data import TextData
    from shear.model.blocks import removed_blocks
    from shear.passes.context import Context
    from shear.passes.manager import PassManager
    from shear.passes.pipeline import parse_pipeline

    if args.quick:
        from shear.zoo import load_tiny_llama

        model, tok, _, name = load_tiny_llama()
    else:
        from shear.zoo import load_smollm2

        model, tok, _, name = load_smollm2()
    data = TextData.from_corpus(tok, max_train_chars=200_000, max_val_chars=40_000)
    print(f"{name}, ratio {args.ratio}, load average {load_average():.1f}, {torch.get_num_threads()} threads")
    dense_params = base_param_count(model)
    n_layers = int(getattr(model, "config").num_hidden_layers)  # noqa: B009 - a transformers model
    head = ["method", "params", "layers", "blocks erased", *sorted(data.validation), "mean ppl", "wall s"]
    rows = []
    ppl = _perplexity(model, data, args.eval_tokens)
    rows.append(["dense", f"{dense_params:,}", n_layers, 0,
                 *[f"{ppl[k]:.2f}" for k in sorted(ppl)], f"{mean(ppl):.2f}", "-"])
    print(markdown_table(head, rows[-1:]))
    for row, spec in ROWS.items():
        if args.only is not None and row not in args.only:
            continue
        pipeline = spec.format(r=args.ratio, n=args.calibration, steps=args.steps)
        ctx = Context(model=copy.deepcopy(model), example_inputs={"input_ids": torch.arange(16).view(1, 16)}, data=data)
        start = time.perf_counter()
        PassManager(parse_pipeline(pipeline)).run(ctx)
        wall = time.perf_counter() - start
        small = ctx.model
        removed = sum(len(k) for k in removed_blocks(small))
        layers = int(getattr(small, "config").num_hidden_layers)  # noqa: B009 - a transformers model
        ppl = _perplexity(small, data, args.eval_tokens)
        rows.append([row, f"{base_param_count(small):,} (-{1 - base_param_count(small) / dense_params:.1%})", layers,
                     removed + 2 * (n_layers - layers),
                     *[f"{ppl[k]:.2f}" for k in sorted(ppl)], f"{mean(ppl):.2f}", f"{wall:.0f}"])
        print(markdown_table(head, rows[-1:]), f"\n  {pipeline}", flush=True)
        choice = ctx.find("lhspg-depth")
        if choice is not None and choice.trials:  # the joint budget's measured depth/width splits
            print("  splits (blocks, depth share, one-shot calibration loss):",
                  ", ".join(f"({t.blocks}, {t.depth_share:.1%}, {t.loss:.3f})" for t in choice.trials), flush=True)
    table = markdown_table(head, rows)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
