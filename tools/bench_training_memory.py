"""Peak memory of LoRA training: full logits vs the chunked loss, with and without gradient checkpointing.

Builds a small LLaMA (default hidden 512, 8 layers, vocab 32000, untied head) in fp32, adds LoRA
(r=8 on every block Linear) with :func:`~shear.runtime.training.ensure_lora`, trains a few steps
with :func:`~shear.runtime.training.train`, and prints per mode:

* frozen MB — base weights and buffers;
* LoRA state MB — LoRA params + their grads + AdamW's two moments;
* peak MB — everything training held at its peak, weights included: on CUDA
  ``max_memory_allocated``; on CPU the peak RSS (VmHWM) minus the RSS before the model was built
  (so the interpreter and libraries are left out);
* ratio — peak / (frozen + LoRA state): 1.0 would mean no activations at all;
* tok/s.

Modes: ``full logits`` (the whole ``(batch, seq, vocab)`` logits, ``loss_chunk_tokens=None``),
``chunked loss`` (the default: 256 tokens of logits at a time), each without and with gradient
checkpointing. Each mode runs in a fresh subprocess so that memory the allocator kept from one run does not
count in the next.

Usage:
    python tools/bench_training_memory.py                      # ~1 minute on 2 CPU cores
    python tools/bench_training_memory.py --layers 2 --steps 2 # smoke
    python tools/bench_training_memory.py --device cuda --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.runtime.training import (
    PeakMemory,
    TokenBatches,
    TrainConfig,
    ensure_lora,
    frozen_bytes,
    lora_state_bytes,
    train,
)
from shear.runtime.training.memory import current_rss_bytes

__all__ = ["main", "measure"]

MB = 1 << 20


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
    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    model, msg = ensure_lora(LlamaForCausalLM(cfg).to(device), r=args.rank)
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: auto, only on CUDA with bf16)")
    p.add_argument("--one", choices=list(MODES), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Run every mode (each in a subprocess) and print the table; returns its rows."""
    args = _parser().parse_args(argv)
    if args.one:
        print(json.dumps(measure(args, args.one)))
        return []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--one", mode], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r={args.rank}, "
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
