"""One script for a GPU machine: LoRAShear end to end on CUDA in bf16, and the numbers that matter.

Runs, in order, each check guarded so that one failure still prints the rest, then one table:

1. ``pipeline``   — the LoRAShear pipeline (lora, discover-groups, lhspg, erase, recover-dynamic,
   merge-lora) on the tiny trained LLaMA on the device; perplexity before and after.
2. ``smollm2``    — SmolLM2-135M LoRAShear at >= 1M training tokens in bf16 (LHSPG 20%, then
   recovery), validation perplexity dense vs pruned, tokens/s.
3. ``erase-1b`` / ``erase-7b`` — LLaMA-3.2-1B / LLaMA-2-7B shapes, random weights built in bf16 on the
   device, 20% of channels and heads zeroed, erased in place and verified (fp32, block by block):
   max diff, peak memory / weight bytes (goal <= 1.3).
4. ``lhspg-7b``   — 20 LHSPG steps on the 7B shape in bf16 at batch 4 x 512 with gradient
   checkpointing: peak memory / weight bytes (goal <= 1.5) and tokens/s.
5. ``step``       — ``tools/bench_step.py`` on SmolLM2 in bf16: shear's LHSPG and recovery steps vs a
   plain peft loop (goal >= 0.8x).
6. ``speed-1b`` / ``speed-7b`` — ``tools/bench_speed.py --dtype bfloat16``: prefill 8 x 512 and decode,
   dense vs 20% / 50% pruned, efficiency (goal >= 0.9 for prefill).

``--device cpu --quick`` runs every check with tiny shapes and budgets, to see that the script works
without a GPU (a few minutes on 2 cores); the numbers then mean nothing.

Usage:
    python tools/gpu_check.py                         # on a CUDA machine, <= 8 minutes on an H100
    python tools/gpu_check.py --device cpu --quick    # smoke test anywhere
    python tools/gpu_check.py --only erase-1b lhspg-7b
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_training_memory import LLAMA_SHAPES  # noqa: E402 - a sibling tool, found through the line above

__all__ = ["main", "CHECKS", "Row"]

SHAPES = {
    **LLAMA_SHAPES,
    "quick": dict(hidden=128, intermediate=344, layers=2, heads=4, kv_heads=2, vocab=512, tied=False),
}
"""LLaMA shapes with random weights; ``quick`` stands in for both on ``--quick``."""


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str
    goal: str = ""
    met: str = ""
    seconds: float = 0.0


def _device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device)


def _peak() -> Callable[[], float]:
    """Start measuring peak memory on the current device; the returned function reads it in bytes."""
    from shear.training import PeakMemory

    meter = PeakMemory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    meter.__enter__()
    return lambda: float(meter.read().peak_bytes)


def _shape(args: argparse.Namespace, name: str) -> SimpleNamespace:
    shape = SHAPES["quick" if args.quick else name]
    return SimpleNamespace(**shape, dtype="bfloat16", device=args.device, seq=512)


def _tiny_data(tokenizer: object, quick: bool):  # noqa: ANN202 - TextData
    from shear.data import TextData

    return TextData.from_corpus(tokenizer, max_train_chars=60_000 if quick else 400_000,
                                max_val_chars=6_000 if quick else 40_000, instructions=32 if quick else 256)


def check_pipeline(args: argparse.Namespace) -> list[Row]:
    import shear
    from shear.zoo import load_tiny_llama

    model, tok, _, _ = load_tiny_llama()
    data = _tiny_data(tok, args.quick)
    steps = (1, 2, 2) if args.quick else (10, 3, 20)
    pipeline = (
        "lora{r=8},discover-groups,"
        f"lhspg{{ratio=0.2,warmup={steps[0]},periods={steps[1]},steps_per_period={steps[2]},batch_size=4,seq_len=128}},"
        f"erase,recover-dynamic{{stages=pretrain+instruct,max_rounds=1,steps_per_round={steps[2]},batch_size=4,"
        "seq_len=128,eval_windows=2},merge-lora"
    )
    dense = data.perplexity(model.to(args.device), seq_len=128, max_windows=8)
    small = shear.compile(model, pipeline, data=data, device=args.device)
    ppl = data.perplexity(small, seq_len=128, max_windows=8)
    mean = sum(ppl.values()) / len(ppl)
    base = sum(dense.values()) / len(dense)
    return [Row("pipeline tiny LLaMA", f"ran on {args.device}: ppl {base:.1f} -> {mean:.1f}, "
                f"verify max diff {small.shear_report.verify_max_diff:.2g}", "runs end to end", "yes")]


def check_smollm2(args: argparse.Namespace) -> list[Row]:
    import shear
    from shear.data import TextData
    from shear.errors import ModelLoadError
    from shear.zoo import load_smollm2, load_tiny_llama

    if args.quick:  # the check's plumbing only: the tiny LLaMA stands in
        model, tok = load_tiny_llama()[:2]
        model, label = model.bfloat16(), "tiny LLaMA (quick)"
    else:
        try:
            model, tok = load_smollm2(dtype=torch.bfloat16)[:2]
        except ModelLoadError as e:
            raise ModelLoadError(f"{e}; the smollm2 check needs it") from e
        label = "SmolLM2-135M"
    data = TextData.from_corpus(tok, max_train_chars=200_000 if args.quick else 6_000_000,
                                max_val_chars=8_000 if args.quick else 60_000, instructions=32 if args.quick else 512)
    # 8 x 256: 40 + 4 x 60 LHSPG steps and 2 x 60 per recovery stage trained 0.92M tokens in 171 s on an
    # H200 (recovery stops a stage early when it no longer gains); 4 x 75 LHSPG steps make it >= 1M
    batch, seq = (2, 64) if args.quick else (8, 256)
    warmup, periods, tp, rounds, per_round = (1, 2, 2, 1, 2) if args.quick else (40, 4, 75, 2, 60)
    pipeline = (
        f"lora{{r=8}},discover-groups,lhspg{{ratio=0.2,warmup={warmup},periods={periods},steps_per_period={tp},"
        f"batch_size={batch},seq_len={seq},calibration=8}},erase,"
        f"recover-dynamic{{stages=pretrain+instruct,max_rounds={rounds},steps_per_round={per_round},"
        f"batch_size={batch},seq_len={seq},eval_windows=4}},merge-lora"
    )
    dense = data.perplexity(model.to(args.device), seq_len=seq, max_windows=16)
    t0 = time.perf_counter()
    small = shear.compile(model, pipeline, data=data, device=args.device)
    wall = time.perf_counter() - t0
    passes = {r.name: r for r in small.shear_report.passes}
    tokens = (warmup + periods * tp) * batch * seq + int(passes["recover-dynamic"].stats.get("tokens", 0))
    ppl = data.perplexity(small, seq_len=seq, max_windows=16)
    mean, base = sum(ppl.values()) / len(ppl), sum(dense.values()) / len(dense)
    goal = 10**6 if not args.quick else 0
    return [Row(f"{label} LoRAShear bf16", f"{tokens / 1e6:.2f}M tokens in {wall:.0f} s ({tokens / wall:,.0f} tok/s "
                f"incl. eval), val ppl {base:.2f} -> {mean:.2f} at -20% params", ">= 1M tokens", "yes" if tokens >= goal else "no")]


def check_erase(args: argparse.Namespace, name: str) -> list[Row]:
    from bench_training_memory import llama_shape

    import shear
    from shear.training import tensor_bytes

    shape = _shape(args, name)
    model = llama_shape(shape)
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    ids = {"input_ids": torch.randint(0, shape.vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(args.device)}
    read = _peak()
    small = shear.compile(model, "discover-groups,random{ratio=0.2,seed=0,kinds=[channel,head]},erase",
                          example_inputs=ids, inplace=True)
    peak = read()
    r = small.shear_report
    ratio = peak / weights
    return [Row(f"erase + verify {name} bf16", f"{r.params_before / 1e9:.2f}B -> {r.params_after / 1e9:.2f}B params, "
                f"max diff {r.verify_max_diff:.2g} (fp32 block by block), peak {peak / 2**30:.1f} GiB = {ratio:.2f}x weights",
                "verified; peak <= 1.3x", "yes" if ratio <= 1.3 else "no")]


def check_lhspg_7b(args: argparse.Namespace) -> list[Row]:
    from bench_training_memory import llama_shape

    from shear.data import TextData
    from shear.passes.base import Context
    from shear.passes.core.discover import DiscoverGroups
    from shear.passes.lorashear.lhspg import LHSPG, LhspgResult
    from shear.training import ensure_lora, tensor_bytes

    shape = _shape(args, "7b")
    model = llama_shape(shape)
    weights = tensor_bytes([*model.parameters(), *model.buffers()])
    model, _ = ensure_lora(model, r=8)
    batch, seq = (2, 64) if args.quick else (4, 512)
    tokens = torch.randint(0, shape.vocab, (batch * seq * 64,), generator=torch.Generator().manual_seed(0))
    data = TextData(tokenizer=None, train={"random": tokens}, validation={"random": tokens[: seq * 4]})
    ctx = Context(model=model, example_inputs={"input_ids": tokens[:16].view(1, 16).to(args.device)}, data=data)
    DiscoverGroups().run(ctx)
    lhspg = LHSPG(ratio=0.2, warmup=4, periods=2, steps_per_period=8, batch_size=batch, seq_len=seq,
                  calibration=2, gradient_checkpointing=True)
    read = _peak()
    lhspg.run(ctx)
    peak = read()
    train = ctx.get(LhspgResult).train
    ratio = peak / weights
    return [Row("LHSPG 7b bf16, 20 steps", f"batch {batch} x {seq}, GC on: peak {peak / 2**30:.1f} GiB = {ratio:.2f}x "
                f"weights ({weights / 2**30:.1f} GiB), {train.tokens_per_s:,.0f} tok/s", "peak <= 1.5x weights",
                "yes" if ratio <= 1.5 else "no")]


def check_step(args: argparse.Namespace) -> list[Row]:
    """``tools/bench_step.py`` in bf16 on the SmolLM2-135M and LLaMA-3.2-1B shapes (random weights:
    step time does not depend on the values, and no model package has to reach the machine)."""
    import bench_step

    rows_out = []
    for model in ["tiny"] if args.quick else ["smollm2-shape", "1b-shape"]:
        argv = ["--device", args.device, "--dtype", "bfloat16", "--steps", "2" if args.quick else "10",
                "--reps", "1" if args.quick else "3", "--batch", "2" if args.quick else "8",
                "--seq", "64" if args.quick else "256", "--model", model]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rows = bench_step.main(argv)
        print(out.getvalue())
        ratios = {str(r["name"]): float(r["ratio"]) for r in rows}
        worst = min(ratios["shear lhspg"], ratios["shear recovery"])
        rows_out.append(Row(f"step throughput bf16, {model}", f"plain peft {float(rows[0]['tok_s']):,.0f} tok/s; lhspg "
                            f"{ratios['shear lhspg']:.2f}x, recovery {ratios['shear recovery']:.2f}x", ">= 0.8x plain",
                            "yes" if worst >= 0.8 else "no"))
    return rows_out


def check_speed(args: argparse.Namespace, name: str) -> list[Row]:
    import bench_speed

    argv = ["--device", args.device, "--dtype", "bfloat16", "--repeats", "2" if args.quick else "5"]
    if args.quick:
        argv += ["--hidden", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "344",
                 "--vocab", "512", "--seq", "32", "--new-tokens", "4", "--round-to", "1"]
    else:
        argv += ["--shape", name, "--seq", "512", "--round-to", "1", "64"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_speed.main(argv)
    text = out.getvalue()
    print(text)
    lines = [ln for ln in text.splitlines() if ln.startswith("-")]
    effs = []
    for ln in lines:  # "<name> params ideal  prefill b1 ms eff  decode b1 ms eff  prefill b8 ms eff ..."
        cells = ln.split()
        effs.append((cells[0] + " " + cells[1], float(cells[-3])))  # prefill b8 efficiency
    worst = min((e for _, e in effs), default=0.0)
    summary = ", ".join(f"{n}: {e:.2f}" for n, e in effs)
    return [Row(f"prefill speed {name} bf16", f"prefill b8 efficiency {summary}", ">= 0.9", "yes" if worst >= 0.9 else "no")]


CHECKS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "pipeline": check_pipeline,
    "smollm2": check_smollm2,
    "erase-1b": lambda a: check_erase(a, "1b"),
    "erase-7b": lambda a: check_erase(a, "7b"),
    "lhspg-7b": check_lhspg_7b,
    "step": check_step,
    "speed-1b": lambda a: check_speed(a, "1b"),
    "speed-7b": lambda a: check_speed(a, "7b"),
}
"""Check name -> function returning its table rows, in the order they run."""


class CheckTimeout(Exception):
    """A check ran past its share of the time (``--limit`` / ``--deadline``)."""


def _alarm(signum: int, frame: object) -> None:
    raise CheckTimeout("ran past its time limit")


def _table(rows: list[Row], header: str) -> str:
    lines = [header, "| check | result | goal | met | s |", "|---|---|---|---|---:|"]
    lines += [f"| {r.check} | {r.result} | {r.goal} | {r.met} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the checks, print one table, return its rows.

    Each check gets at most ``--limit`` seconds and the run ``--deadline`` seconds in all (a SIGALRM
    ends a check that overruns, and its row says so), so the table is always printed; ``--out``
    rewrites the table to a file after every check, so a killed run still leaves what it measured.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes and budgets (a smoke test on any machine)")
    p.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    p.add_argument("--limit", type=int, default=240, help="seconds one check may take")
    p.add_argument("--deadline", type=int, default=480, help="seconds the whole run may take")
    p.add_argument("--out", type=Path, help="also write the table to this file after each check")
    args = p.parse_args(argv)
    device = _device(args)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[Row] = []
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)

    def header() -> str:
        return (f"{card}, torch {torch.__version__}, {'quick' if args.quick else 'full'} run, "
                f"{time.perf_counter() - start:.0f} s in all")

    for name, fn in CHECKS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        budget = int(min(args.limit, args.deadline - (t0 - start)))
        if budget < 5:
            got = [Row(name, f"SKIPPED: {budget} s left (--limit, --deadline)", "", "no")]
        else:
            signal.alarm(budget)
            try:
                got = fn(args)
            except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
                traceback.print_exc()
                got = [Row(name, f"FAILED after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {str(e)[:160]}",
                           "", "no")]
            finally:
                signal.alarm(0)
        for r in got:
            r.seconds = time.perf_counter() - t0
        rows.extend(got)
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
        print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.out:
            args.out.write_text(_table(rows, header()))
    text = _table(rows, header())
    print("\n" + text)
    return rows


if __name__ == "__main__":
    main()
