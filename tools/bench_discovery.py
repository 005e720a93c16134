"""Benchmark: trace + grouping time and peak RSS for LLaMA shapes on the meta device.

Each shape runs in a fresh subprocess so peak RSS is its own. Prints a Markdown table.

    python -m tools.bench_discovery                 # hidden 1024/2048/4096 x 2/8/32 layers
    python -m tools.bench_discovery --quick         # a few small shapes
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from tools.bench_common import markdown_table

__all__ = ["measure", "main"]

ROOT = Path(__file__).resolve().parents[1]


def measure(hidden: int, layers: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import shear

    heads = hidden // 128
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    t0 = time.perf_counter()
    g = shear.trace(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long)})
    total = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"hidden": hidden, "layers": layers, "heads": heads, "export_s": g.trace_seconds,
            "group_s": g.group_seconds, "total_s": total, "rss_mb": rss_mb,
            "groups": len(g.prunable_groups), "structures": g.num_structures()}


def main(argv: list[str] | None = None) -> None:
    """Measure each shape in a subprocess of its own (``--one``) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    shapes = [(1024, 2), (2048, 2)] if args.quick else [(h, n) for h in (1024, 2048, 4096) for n in (2, 8, 32)]
    rows = []
    for h, n in shapes:
        out = subprocess.run([sys.executable, "-m", "tools.bench_discovery", "--one", str(h), str(n)],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    head = ["hidden", "layers", "heads", "export s", "grouping s", "total s", "peak RSS MB", "prunable groups", "structures"]
    cells = [[r["hidden"], r["layers"], r["heads"], f"{r['export_s']:.2f}", f"{r['group_s']:.2f}", f"{r['total_s']:.2f}",
              f"{r['rss_mb']:.0f}", r["groups"], r["structures"]] for r in rows]
    print(markdown_table(head, cells, align="r" * len(head)))


if __name__ == "__main__":
    main()
