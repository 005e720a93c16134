"""One command for a GPU machine: run the GPU checks (``tests/gpu``) and print their table.

The checks are tests marked ``@pytest.mark.gpu`` (``tests/gpu/test_gpu.py``: the LoRAShear pipeline on
CUDA, SmolLM2-135M LoRAShear at >= 1M tokens in bf16, 1B / 7B-shape erase + verify peak memory,
7B-shape LHSPG peak memory, step throughput against plain peft, prefill speed against the parameter
count); each asserts its goal. This runner calls pytest on them in a subprocess, collects the row each
test recorded (``SHEAR_GPU_ROWS``), adds a row for each test that failed or skipped before recording,
and prints one Markdown table; ``--out`` also writes it. The exit status is pytest's.

``--quick`` (with ``--device cpu`` anywhere) runs every check with tiny shapes and budgets, to see the
plumbing work without a GPU (a few minutes on 2 cores); the numbers then mean nothing and the goals
are not asserted. Each check gets at most ``--limit`` seconds (``SHEAR_GPU_LIMIT``), the whole run
``--deadline`` seconds; past it pytest is stopped and the rows measured so far are printed.

Usage:
    python -m tools.gpu_check                         # on a CUDA machine, <= 8 minutes on an H100
    python -m tools.gpu_check --device cpu --quick    # smoke test anywhere
    python -m tools.gpu_check --only erase lhspg      # pytest -k: tests whose names contain these
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from tools.bench_common import markdown_table

__all__ = ["TESTS", "main", "run", "table"]

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/gpu"
"""The GPU checks, relative to the repository root."""


def _outcomes(junit: Path) -> dict[str, tuple[str, float]]:
    """Test id -> (``passed``, or ``FAILED: ...`` / ``ERROR: ...`` / ``SKIPPED: ...`` with the message;
    seconds)."""
    if not junit.exists():
        return {}
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        status = "passed"
        for tag, label in (("failure", "FAILED"), ("error", "ERROR"), ("skipped", "SKIPPED")):
            found = case.find(tag)
            if found is not None:
                status = f"{label}: {(found.get('message') or '').splitlines()[0][:160] if found.get('message') else ''}"
                break
        out[name] = (status, float(case.get("time", 0.0)))
    return out


def run(pytest_args: list[str], env: dict[str, str], deadline: int) -> tuple[int, list[dict[str, Any]]]:
    """Run pytest on :data:`TESTS` with ``pytest_args``; return its exit status and the table rows."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file, junit = Path(tmp) / "rows.jsonl", Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-s",
               f"--junitxml={junit}", TESTS, *pytest_args]
        try:
            code = subprocess.run(cmd, cwd=ROOT, env={**env, "SHEAR_GPU_ROWS": str(rows_file)}, timeout=deadline).returncode
        except subprocess.TimeoutExpired:
            code = 124
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        recorded = {r["test"].rsplit("::", 1)[-1] for r in rows}
        for test, (status, seconds) in _outcomes(junit).items():
            short = test.rsplit("::", 1)[-1]
            if status != "passed" and short not in recorded:
                met = None if status.startswith("SKIPPED") else False  # a skip meets nothing and fails nothing
                rows.append({"test": test, "check": short, "result": status, "goal": "", "met": met})
            for r in rows:
                if r["test"].endswith(short):
                    r["seconds"] = seconds
                    if status.startswith(("FAILED", "ERROR")) and short in recorded:  # its assertion failed
                        r["result"] += f" ({status.split(':')[0]})"
        if code == 124:
            rows.append({"test": "", "check": "deadline", "result": f"stopped after {deadline} s (--deadline)",
                         "goal": "", "met": False})
    return code, rows


def table(rows: list[dict[str, Any]], header: str) -> str:
    """The GPU table: check, result, goal, met, seconds."""
    cells = [[r["check"], r["result"], r["goal"], "-" if r["met"] is None else "yes" if r["met"] else "no",
              f"{r.get('seconds', 0.0):.0f}"]
             for r in rows]
    return header + "\n" + markdown_table(["check", "result", "goal", "met", "s"], cells, align="----r") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the GPU tests, print (and with ``--out`` write) the table; return pytest's exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda when present (the tests skip without it)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and budgets (a smoke test on any machine)")
    p.add_argument("--only", nargs="*", default=[], help="run only tests whose names contain these words (pytest -k)")
    p.add_argument("--limit", type=int, default=240, help="seconds one check may take")
    p.add_argument("--deadline", type=int, default=480, help="seconds the whole run may take")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    env = {**os.environ, "SHEAR_GPU_LIMIT": str(args.limit)}
    if args.device:
        env["SHEAR_GPU_DEVICE"] = args.device
    if args.quick:
        env["SHEAR_GPU_QUICK"] = "1"
    extra = ["-k", " or ".join(args.only)] if args.only else []
    start = time.perf_counter()
    code, rows = run(extra, env, args.deadline)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    header = (f"{card}, torch {torch.__version__}, {'quick' if args.quick else 'full'} run, "
              f"{time.perf_counter() - start:.0f} s in all, pytest exit status {code}")
    text = table(rows, header)
    print("\n" + text)
    if args.out:
        args.out.write_text(text)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
