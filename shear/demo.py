"""The README demo: prune SmolLM2-135M-Instruct by 20% and show what it cost.

    python -m shear.demo                  # ./dev demo runs this; about 5-10 minutes on 2 CPU cores
    python -m shear.demo --quick          # a smoke run with tiny evaluation budgets (CI)

Loads SmolLM2-135M-Instruct from its registry package (converted and cached on first use),
measures perplexity on each source of the committed validation corpus and a greedy generation,
prunes with the strongest pipeline this checkout has (see :data:`PIPELINES`), measures again, and
writes ``report.md``, ``report.json``, the self-contained page ``report.html`` and the folded
node-group drawing ``groups.svg`` of the LoRA-wrapped IR the pipeline pruned (``groups.dot``
without graphviz) under ``--out`` (default ``out/demo``). Nothing is downloaded.

Example:
    >>> args = parse_args(["--quick", "--out", "/tmp/demo"])
    >>> args.eval_tokens, args.ratio
    (96, 0.2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PIPELINES", "choose_pipeline", "parse_args", "run_demo", "main", "DemoResult"]

_KD = 'knowledge-distribution{{max_windows=1,seq_len={kd_len},include=basic,out_dir="{out}"}}'
PIPELINES: tuple[tuple[str, str], ...] = (
    (
        "lora,discover-groups," + _KD + ",lhspg{{ratio={ratio},{lhspg}}},erase,recover-dynamic{{{recover}}},merge-lora",
        "LoRAShear: knowledge distribution, LHSPG, erase, dynamic recovery",
    ),
    (
        "lora,discover-groups," + _KD + ",lhspg{{ratio={ratio},{lhspg}}},erase,merge-lora",
        "LoRAShear without recovery: knowledge distribution, LHSPG, erase",
    ),
    ("magnitude{{ratio={ratio}}},erase", "structured magnitude pruning + erase"),
    ("random{{ratio={ratio},seed=0}},erase", "random structured pruning + erase (baseline)"),
)
"""Pipelines from strongest to weakest; the demo runs the first whose passes are all registered
(with the ``--quick`` or the default training budget filled in)."""

BUDGETS: dict[bool, dict[str, str]] = {
    False: {
        "lhspg": "periods=4,steps_per_period=3,warmup=0,batch_size=4,seq_len=128,lr=0.0005",
        "recover": "max_rounds=4,steps_per_round=12,batch_size=4,seq_len=128,eval_windows=2,lr=0.0003",
        "kd_len": "128",
    },
    True: {
        "lhspg": "periods=1,steps_per_period=2,warmup=0,batch_size=1,seq_len=32,lr=0.0005",
        "recover": "max_rounds=2,steps_per_round=2,batch_size=1,seq_len=32,eval_windows=1,lr=0.0003",
        "kd_len": "32",
    },
}
"""Training budgets of the LoRAShear pipelines: the default run and ``--quick`` (CI)."""

PROMPTS: tuple[tuple[str, bool], ...] = (
    ("What is the capital of France?", True),
    ("In the beginning God created", False),
)
"""Greedy-generation prompts, ``(prompt, use the chat template)``."""


@dataclass
class DemoResult:
    """Everything the demo measured (``report.json`` is this, as plain data)."""

    model: str
    pipeline: str | None = None
    pruning: str = "not run"
    params_before: int = 0
    params_after: int | None = None
    ppl_before: dict[str, Any] = field(default_factory=dict)
    ppl_after: dict[str, Any] | None = None
    generations: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    drawing: str | None = None
    html_report: str | None = None
    compile_report: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--quick`` shrinks every budget)."""
    p = argparse.ArgumentParser(prog="python -m shear.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--ratio", type=float, default=0.2, help="share of parameters LHSPG removes, or of each group for the baselines (0.2)")
    p.add_argument(
        "--pipeline", default=None, help="pipeline string to run instead of the strongest available"
    )
    p.add_argument("--quick", action="store_true", help="tiny evaluation budgets, short generations (CI)")
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens per source (default 2048; quick 96)")
    p.add_argument("--window", type=int, default=None, help="perplexity window (default 512; quick 96)")
    p.add_argument(
        "--stride", type=int, default=None, help="perplexity stride (default window/2; quick window)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="greedy tokens per prompt (default 40; quick 8)"
    )
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="model cache (default $SHEAR_CACHE or ~/.cache/shear)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-draw", action="store_true", help="skip the node-group drawing")
    p.add_argument(
        "--verify-tol",
        type=float,
        default=1e-2,
        help="max |logit diff| allowed between the masked and the erased model (default 1e-2: fp32 "
        "summation-order noise over 30 layers reaches ~1e-3 on logits of size ~20)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    args.eval_tokens = args.eval_tokens or (96 if quick else 2048)
    args.window = args.window or (96 if quick else 512)
    args.stride = args.stride or (args.window if quick else args.window // 2)
    args.new_tokens = args.new_tokens or (8 if quick else 40)
    return args


def choose_pipeline(
    ratio: float, override: str | None = None, quick: bool = False, out: Path = Path("out/demo")
) -> tuple[str | None, str]:
    """The pipeline string to run and why; ``(None, reason)`` when pruning is not available yet.

    Example:
        >>> choose_pipeline(0.2, "random{ratio=0.2},erase")
        ('random{ratio=0.2},erase', 'given with --pipeline')
    """
    if override:
        return override, "given with --pipeline"
    try:
        import shear

        if not hasattr(shear, "compile"):
            return None, "shear.compile does not exist yet"
        from shear.passes import import_errors
    except Exception as e:  # noqa: BLE001 - the pruning API is under construction; say why and go on
        return None, f"the pruning API does not import yet ({type(e).__name__}: {e})"
    from shear.passes import parse_pipeline

    skipped = []
    for template, what in PIPELINES:
        pipeline = template.format(ratio=ratio, out=out, **BUDGETS[quick])
        try:
            parse_pipeline(pipeline)  # unknown pass or option -> PipelineError
        except Exception as e:  # noqa: BLE001 - a pass under construction may fail in other ways too
            skipped.append(f"{pipeline}: {e}")
            continue
        return pipeline, what
    broken = "; ".join(f"{m}: {e}" for m, e in import_errors().items())
    return None, "no pruning pipeline is available yet (" + "; ".join(
        skipped + ([broken] if broken else [])
    ) + ")"


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _evaluate(model: Any, tokenizer: Any, texts: dict[str, str], args: argparse.Namespace, label: str) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from shear.evaluation import evaluate_perplexity, forward_tokens

    total = 0
    for text in texts.values():
        n = min(len(tokenizer(text, add_special_tokens=False)["input_ids"]), args.eval_tokens)
        total += forward_tokens(n, args.window, args.stride)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task(f"perplexity {label}", total=total)
        return evaluate_perplexity(
            model,
            tokenizer,
            texts,
            window=args.window,
            stride=args.stride,
            max_tokens=args.eval_tokens,
            progress=lambda n: bar.advance(task, n),
        )


def _generate(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[str]:
    from shear.evaluation import greedy_generate

    return [
        greedy_generate(model, tokenizer, p, chat=chat, max_new_tokens=args.new_tokens) for p, chat in PROMPTS
    ]


def _draw(model: Any, example: dict[str, Any], out: Path, graph: Any = None) -> str:
    """The folded node-group drawing of ``graph`` (the IR the pipeline pruned), else of ``model`` traced."""
    import shear

    graph = graph if graph is not None else shear.trace(model, example)
    path = shear.draw(graph, out / "groups.svg")
    return str(path)


def _write_html(result: DemoResult, details: Any, out: Path) -> Path:
    """``report.html``: the pipeline's report data plus the demo's perplexities and generations."""
    from shear.report import ReportData, write_html

    details = details if details is not None else ReportData(title="", notes=[result.pruning])
    details.title = f"shear demo: {result.model}"
    details.model = details.model or result.model
    details.perplexity = {
        "before": result.ppl_before.get("sources", {}),
        "after": (result.ppl_after or {}).get("sources") or {},
    }
    details.generations = result.generations
    return write_html(details, out / "report.html")


def _ppl_table(result: DemoResult) -> str:
    before = result.ppl_before["sources"]
    after = (result.ppl_after or {}).get("sources", {})
    rows = ["| source | tokens | ppl before | ppl after |", "|---|---|---|---|"]
    for name, b in before.items():
        a = after.get(name)
        rows.append(
            f"| {name} | {b['tokens']} | {b['ppl']:.2f} | {a['ppl']:.2f} |"
            if a
            else f"| {name} | {b['tokens']} | {b['ppl']:.2f} | - |"
        )
    mean_after = f"{result.ppl_after['mean_ppl']:.2f}" if result.ppl_after else "-"
    rows.append(f"| **mean** | | {result.ppl_before['mean_ppl']:.2f} | {mean_after} |")
    return "\n".join(rows)


def write_report(result: DemoResult, out: Path) -> Path:
    """Write ``report.json`` and ``report.md`` under ``out``; return the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.__dict__, indent=1, default=str) + "\n")
    after = f"{result.params_after:,}" if result.params_after is not None else "-"
    lines = [
        f"# shear demo: {result.model}",
        "",
        f"- pipeline: `{result.pipeline}` ({result.pruning})"
        if result.pipeline
        else f"- pruning: {result.pruning}",
        f"- parameters: {result.params_before:,} before, {after} after",
        f"- perplexity: sliding window {result.settings.get('window')}, stride {result.settings.get('stride')}, "
        f"first {result.settings.get('eval_tokens')} tokens of each source's {result.settings.get('split')} split",
        "",
        _ppl_table(result),
        "",
        "## Greedy generations",
        "",
    ]
    for g in result.generations:
        lines += [
            f"**{g['prompt']}**",
            "",
            f"- before: {g['before']!r}",
            f"- after: {g.get('after', '-')!r}",
            "",
        ]
    lines += ["## Time (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in result.seconds.items()]
    if result.drawing:
        lines += ["", f"Node-group drawing: `{result.drawing}`"]
    if result.compile_report:
        lines += ["", "## Compile report", "", "```", result.compile_report.rstrip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(args: argparse.Namespace) -> DemoResult:
    """Load, evaluate, prune, evaluate again, draw and report (see the module docstring)."""
    import torch
    from rich.console import Console

    from shear.data import load_corpus
    from shear.zoo import load_smollm2, smollm2_cache_path

    console = Console(stderr=False)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = DemoResult(
        model="SmolLM2-135M-Instruct",
        settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    )

    converting = not smollm2_cache_path(args.cache_dir).exists()
    with console.status(
        "converting the packaged GGUF file (first run only)" if converting else "loading SmolLM2"
    ):
        t = time.perf_counter()
        model, tokenizer, path, _ = load_smollm2(args.cache_dir)
        result.seconds["load (convert)" if converting else "load"] = time.perf_counter() - t
    result.params_before = _params(model)
    console.print(
        f"[bold]SmolLM2-135M-Instruct[/] from {path}: {result.params_before:,} parameters, {torch.get_num_threads()} threads"
    )

    texts = load_corpus(args.split)
    t = time.perf_counter()
    before = _evaluate(model, tokenizer, texts, args, "before")
    result.seconds["perplexity before"] = time.perf_counter() - t
    result.ppl_before = before.as_dict()
    console.print(before.table())
    t = time.perf_counter()
    result.generations = [
        {"prompt": p, "before": g}
        for (p, _), g in zip(PROMPTS, _generate(model, tokenizer, args), strict=True)
    ]
    result.seconds["generation before"] = time.perf_counter() - t

    pipeline, why = choose_pipeline(args.ratio, args.pipeline, args.quick, args.out)
    result.pipeline = pipeline
    details = None
    example = {"input_ids": tokenizer(texts["kjv"][:400], return_tensors="pt")["input_ids"][:, :32]}
    if pipeline is None:
        result.pruning = f"pruning is not available yet: {why}"
        console.print(f"[yellow]{result.pruning}[/]; reporting the unpruned model only")
    else:
        import shear

        console.print(f"pruning {args.ratio:.0%} with [bold]{pipeline}[/] ({why})")
        t = time.perf_counter()
        from shear.data import TextData

        data = TextData.from_corpus(
            tokenizer, max_train_chars=20_000 if args.quick else 200_000, max_val_chars=4_000 if args.quick else None,
            instructions=16 if args.quick else 256,
        )
        small = shear.compile(
            model, passes=pipeline, example_inputs=example, data=data, verify=args.verify_tol, progress=True
        )
        result.seconds["prune"] = time.perf_counter() - t
        result.pruning = why
        report = getattr(small, "shear_report", None)
        result.compile_report = str(report) if report is not None else None
        details = getattr(report, "details", None)
        result.settings["verify_max_diff"] = getattr(report, "verify_max_diff", None)
        result.params_after = _params(small)
        console.print(
            f"parameters {result.params_before:,} -> {result.params_after:,} ({1 - result.params_after / result.params_before:.1%} fewer)"
        )
        t = time.perf_counter()
        after = _evaluate(small, tokenizer, texts, args, "after")
        result.seconds["perplexity after"] = time.perf_counter() - t
        result.ppl_after = after.as_dict()
        console.print(after.table())
        t = time.perf_counter()
        for g, text in zip(result.generations, _generate(small, tokenizer, args), strict=True):
            g["after"] = text
        result.seconds["generation after"] = time.perf_counter() - t
    for g in result.generations:
        console.print(f"[bold]{g['prompt']}[/]\n  before: {g['before']!r}\n  after:  {g.get('after', '-')!r}")

    if not args.no_draw:
        t = time.perf_counter()
        try:
            with console.status("tracing and drawing node groups"):
                result.drawing = _draw(model, example, args.out, getattr(details, "graph", None))
        except Exception as e:  # noqa: BLE001 - the drawing is optional; say why it is missing
            result.drawing = None
            console.print(f"[yellow]no node-group drawing: {type(e).__name__}: {e}[/]")
        result.seconds["draw"] = time.perf_counter() - t
    result.seconds["total"] = time.perf_counter() - start
    result.html_report = str(_write_html(result, details, args.out))
    path = write_report(result, args.out)
    console.print(f"report: {path}, {result.html_report}  (total {result.seconds['total']:.0f} s)")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m shear.demo``."""
    args = parse_args(argv)
    from shear.errors import ShearError

    try:
        run_demo(args)
    except ShearError as e:
        print(f"shear demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
