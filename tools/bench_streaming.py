"""Measure planning and the streamed prune on a LLaMA-2-7B-shaped bf16 checkpoint (random weights).

The checkpoint (32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32000; 13.5 GB in bf16) is
written once under ``--work`` (default /tmp) tensor by tensor, so creating it never needs the whole
model in memory either, and reused by later runs. Then, each stage with its peak RSS reset
(Linux VmHWM), the tool runs ``shear.plan`` and ``shear.prune_streamed`` (magnitude at
``--ratio``) and prints stage, wall seconds and peak RSS MB.

Usage::

    OMP_NUM_THREADS=1 python -m tools.bench_streaming --work /tmp --ratio 0.2
    python -m tools.bench_streaming --work /tmp --clean          # remove the 7B files afterwards

Example:
    >>> LLAMA2_7B["hidden_size"], LLAMA2_7B["num_hidden_layers"]
    (4096, 32)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

__all__ = ["LLAMA2_7B", "write_random_checkpoint", "main"]

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}
"""config.json of a LLaMA-2-7B-shaped model."""

SHARD_BYTES = 4 << 30


def write_random_checkpoint(path: Path, config: dict[str, object], *, shard_bytes: int = SHARD_BYTES) -> None:
    """Write a bf16 checkpoint of ``config`` with random weights, one tensor in memory at a time."""
    from shear.io.outputs import atomic_dir
    from shear.scale.shards import INDEX
    from shear.scale.source import meta_model, read_config
    from shear.scale.writer import SafetensorsWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        cfg, _ = read_config(tmp / "config.json")
        names = [(n, tuple(p.shape)) for n, p in meta_model(cfg).state_dict().items()]
        shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
        size = 0
        for name, shape in names:
            n = math.prod(shape) * 2
            if shards[-1] and size + n > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape))
            size += n
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with SafetensorsWriter(tmp / file, [(n, torch.bfloat16, s) for n, s in shard]) as w:
                for name, shape in shard:
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    if name.endswith("norm.weight"):
                        t = 1 + 0.1 * torch.randn(shape, generator=g)
                    else:
                        t = 0.02 * torch.randn(shape, generator=g)
                    w.write(name, t.to(torch.bfloat16))
                    weight_map[name] = file
                    del t
            print(f"  wrote {file}", file=sys.stderr)
        total = sum(math.prod(s) * 2 for _, s in names)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp", help="folder for the 7B checkpoint and its pruned copy (default /tmp)")
    parser.add_argument("--ratio", type=float, default=0.2, help="per-group ratio (default 0.2)")
    parser.add_argument("--clean", action="store_true", help="remove the checkpoint and the output, then exit")
    args = parser.parse_args(argv)
    root = Path(args.work) / "shear-bench-llama2-7b"
    src, out = root / "src", root / "pruned"
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
        return 0

    import shear
    from shear.scale.shards import ShardedCheckpoint
    from shear.scale.stream import Stage, measure_stage

    stages: list[Stage] = []
    try:
        ShardedCheckpoint.open(src)
        print(f"reusing {src}", file=sys.stderr)
    except shear.CheckpointError:
        shutil.rmtree(src, ignore_errors=True)
        print(f"writing a random LLaMA-2-7B-shaped bf16 checkpoint to {src}", file=sys.stderr)
        with measure_stage("create checkpoint", stages):
            write_random_checkpoint(src, LLAMA2_7B)
    with measure_stage("shear plan", stages):
        p = shear.plan(src, group_ratio=args.ratio, round_to=1)  # the per-group ratio the results were measured at
    print(p.format(), file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = shear.prune_streamed(src, out, group_ratio=args.ratio, round_to=1)
    total = time.perf_counter() - t0
    stages += list(report.stages)
    print(report.format(), file=sys.stderr)
    check = ShardedCheckpoint.open(out)
    size_in, size_out = ShardedCheckpoint.open(src).nbytes(), check.nbytes()
    print(f"\nLLaMA-2-7B shape, bf16, ratio {args.ratio}: {size_in / 1e9:.1f} GB -> {size_out / 1e9:.1f} GB; "
          f"{report.params_before:,} -> {report.params_after:,} parameters; streamed prune {total:.0f} s")
    print(f"| {'stage':<22} | {'wall s':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 13}|")
    for s in stages:
        print(f"| {s.name:<22} | {s.seconds:>7.1f} | {s.peak_rss_bytes / 2**20:>11.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
