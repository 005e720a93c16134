"""Every causal-LM architecture of the installed transformers, tiny, pruned at random and erased.

For each ``model_type`` transformers maps to a causal LM, a tiny model is built from its shrunk
default config (:mod:`shear.zoo.tiny_configs`, random weights, nothing downloaded), pruned at random
(``ratio`` of every prunable group, one seed), erased, and the small model's logits compared with
the masked model's on fresh inputs. Each architecture ends in one outcome:

- ``exact``: erased, verified, and within ``TOLERANCE`` of the masked model;
- ``nothing prunable``: traced, but every structure is pinned (the pins say why);
- ``refused``: a ``ShearError`` that names what shear cannot handle;
- ``mismatch``: verification failed, or the small model differs from the masked one;
- ``crash``: any other exception (a fault in shear);
- ``untraced``: ``torch.export`` does not trace the model (outside the sweep's count);
- ``unbuilt``: the tiny config does not run in transformers itself (outside the count).

Rows go to a JSON-lines file as they finish, so an interrupted sweep goes on where it stopped
(``--resume``); an architecture that was running when the process died is recorded as a crash.

    OMP_NUM_THREADS=1 python -m tools.arch_sweep --out /tmp/sweep.jsonl --resume
    python -m tools.arch_sweep --archs gpt_neo xglm mvp     # a few, printed
    python -m tools.arch_sweep --out /tmp/sweep.jsonl --table-only
"""

from __future__ import annotations

import argparse
import json
import signal
import time
import traceback
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn

__all__ = ["COUNTED", "TOLERANCE", "main", "summary", "sweep_one", "table"]

TOLERANCE = 1e-5
"""Largest |logit difference| between the erased and the masked model that counts as exact (fp32),
relative to the largest |logit| where that is above 1."""
COUNTED = ("exact", "nothing prunable", "refused", "mismatch", "crash")
"""Outcomes of architectures torch.export traces: the ones the sweep's share of exact counts over."""


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _Timeout


def _ids(seed: int, batch: int, length: int) -> torch.Tensor:
    from shear.zoo.tiny_configs import TINY_VOCAB

    return torch.randint(3, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[:400]}"


def _caused_by(e: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``e`` or an exception it was raised from is a ``kind`` (a pass wraps its errors)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__
    return False


def sweep_one(arch: str, ratio: float = 0.3, seed: int = 0) -> dict[str, Any]:
    """Build, trace, prune ``ratio`` at random, erase and compare one architecture; one row."""
    import shear
    from shear.errors import ShearError, TraceError, VerifyError
    from shear.graph.trace import export_model
    from shear.zoo.tiny_configs import tiny_causal_lm

    row: dict[str, Any] = {"arch": arch}
    t0 = time.perf_counter()
    inputs = {"input_ids": _ids(0, 2, 12)}
    try:
        model = tiny_causal_lm(arch)
        _logits(model, inputs["input_ids"])
    except Exception as e:  # noqa: BLE001 - the tiny config itself does not run: not shear's to judge
        return {**row, "outcome": "unbuilt", "error": _error(e)}
    row["params"] = sum(p.numel() for p in model.parameters())
    try:
        export_model(model, inputs)
    except TraceError as e:
        return {**row, "outcome": "untraced", "error": _error(e.__cause__ or e)}
    spec = f"discover-groups,random{{ratio={ratio},seed={seed}}}"
    try:
        graph = shear.trace(model, inputs)
        row["kinds"] = sorted({g.kind for g in graph.prunable_groups})
        if not graph.prunable_groups:  # the pins of inner structures first: a vocabulary is pinned by design
            ordered = sorted(graph.pruning_groups, key=lambda g: g.kind == "residual")
            reasons = [f"{g.name}: {r}" for g in ordered for r in g.reasons
                       if not r.startswith(("vocabulary", "LoRA rank", "model output"))]  # fmt: skip
            return {**row, "outcome": "nothing prunable", "error": reasons[0] if reasons else "no pruning groups"}
        masked = shear.compile(model, spec, example_inputs=inputs)
        small = shear.compile(model, spec + ",erase", example_inputs=inputs)
        other = _ids(1, 2, 12)  # the traced shape: a GraphModule may fix it
        want = _logits(masked, other)
        diff = float((want - _logits(small, other)).abs().max())
        scale = max(1.0, float(want.abs().max()))
    except ShearError as e:
        return {**row, "outcome": "mismatch" if _caused_by(e, VerifyError) else "refused", "error": _error(e)}
    except Exception as e:  # noqa: BLE001 - any other exception is a fault in shear: a row that says so
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {**row, "outcome": "crash", "error": _error(e), "at": f"{where.filename}:{where.lineno}"}
    row.update(after=sum(p.numel() for p in small.parameters()), diff=diff, seconds=time.perf_counter() - t0,
               emitted="GraphModule" if isinstance(small, torch.fx.GraphModule) else "module tree")
    row["outcome"] = "exact" if diff <= TOLERANCE * scale else "mismatch"
    return row


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """The rows already in the JSON-lines file ``path``, by architecture (the last row of each wins)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["arch"]] = r
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    """One line: counts per outcome and the share of exact among the traced architectures."""
    counts = Counter(r["outcome"] for r in rows)
    traced = sum(counts[o] for o in COUNTED)
    share = counts["exact"] / traced if traced else 0.0
    parts = ", ".join(f"{counts[o]} {o}" for o in (*COUNTED, "untraced", "unbuilt") if counts[o])
    return f"{len(rows)} architectures: {parts}; exact {counts['exact']}/{traced} traced = {share:.1%}"


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of every row that is not exact (exact ones are counted in the summary)."""
    order = (*COUNTED, "untraced", "unbuilt")
    lines = ["| architecture | outcome | reason |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: (order.index(r["outcome"]), r["arch"])):
        if r["outcome"] != "exact":
            reason = str(r.get("error", "")).splitlines()[0].replace("|", "\\|")[:160]
            lines.append(f"| {r['arch']} | {r['outcome']} | {reason} |")
    return summary(rows) + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from shear.zoo.tiny_configs import causal_lm_types

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", help="model_types to sweep (default: every causal LM)")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per architecture before it is a crash")
    ap.add_argument("--out", type=Path, help="JSON-lines file of the rows (one per architecture)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and sweep the rest")
    ap.add_argument("--table-only", action="store_true", help="print the table of the rows in --out")
    args = ap.parse_args(argv)
    archs = args.archs or list(causal_lm_types())
    done = _read(args.out) if args.out and (args.resume or args.table_only) else {}
    if args.out and not args.resume and not args.table_only:
        args.out.write_text("")
    running = args.out.with_suffix(".running") if args.out else None
    if running and running.exists() and args.resume:  # the process died inside this architecture
        arch = running.read_text().strip()
        if arch and arch not in done:
            done[arch] = {"arch": arch, "outcome": "crash", "error": "the process died inside this architecture"}
            with args.out.open("a") as f:  # type: ignore[union-attr]
                f.write(json.dumps(done[arch]) + "\n")
    if not args.table_only:
        signal.signal(signal.SIGALRM, _alarm)
        for arch in (a for a in archs if a not in done):
            if running:
                running.write_text(arch)
            signal.alarm(args.timeout)
            try:
                row = sweep_one(arch, args.ratio, args.seed)
            except _Timeout:
                row = {"arch": arch, "outcome": "crash", "error": f"timed out after {args.timeout} s"}
            finally:
                signal.alarm(0)
            done[arch] = row
            print(f"{arch}: {row['outcome']} {row.get('error', '')[:200]}", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        if running and running.exists():
            running.unlink()
    rows = [done[a] for a in archs if a in done]
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
