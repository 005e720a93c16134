"""Keep up with new torch / transformers / peft releases on purpose: what a newer stack changes.

``./dev compat`` runs this twice, once in the pinned environment (``.venv``, installed from
``constraints.txt``) and once in a fresh one with the newest releases (``.venv-compat``), then
compares the two snapshots. A snapshot holds, for the environment it runs in:

- the versions of torch, transformers, peft and accelerate;
- the IR structure (``shear.graph.ir.format_structure``: groups, sizes, pin kinds, LoRA
  composites, overlaps) of every architecture of :mod:`tools.arch_coverage`, plain and with LoRA —
  the property that matters: the same model traced under two releases gives the same groups;
- the coverage row of each architecture (prune at random, erase, verify, save/load);
- the outcome of the architecture test suites per architecture (``pytest`` on ``SUITES``).

    python -m tools.compat snapshot out/compat/pinned.json          # in one environment
    python -m tools.compat snapshot out/compat/newest.json          # in another
    python -m tools.compat compare out/compat/pinned.json out/compat/newest.json

``compare`` prints a Markdown table (one row per architecture: groups same/changed, coverage
row, suite outcome in each environment) and the first lines of every structure diff. It exits 1
when anything got worse, so it can gate a bump of ``constraints.txt`` (done in its own commit).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["PACKAGES", "SUITES", "compare", "main", "snapshot"]

PACKAGES = ("torch", "transformers", "peft", "accelerate")
SUITES = ("tests/test_trace.py", "tests/test_architectures.py", "tests/test_erase.py", "tests/test_save_load.py")
"""The test files whose outcome the table reports per architecture."""


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def _structures(archs: list[str]) -> dict[str, str]:
    import torch

    import shear
    from shear.graph.ir import format_structure
    from tools.arch_coverage import ARCHITECTURES, VOCAB, with_lora

    out: dict[str, str] = {}
    for arch in archs:
        for lora in (False, True):
            key = f"{arch}{'+lora' if lora else ''}"
            try:
                torch.manual_seed(0)
                model = ARCHITECTURES[arch]().float().eval()
                model = with_lora(model) if lora else model
                ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
                out[key] = format_structure(shear.trace(model, {"input_ids": ids}))
            except Exception as e:  # noqa: BLE001 - a failing trace is a result of the snapshot
                out[key] = f"error: {type(e).__name__}: {str(e)[:300]}"
    return out


def _suites(archs: list[str]) -> dict[str, dict[str, int]]:
    """Per architecture: passed/failed counts of the suite tests whose id names it; ``*`` for the rest."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *SUITES], cwd=ROOT, check=False, capture_output=True)  # fmt: skip
        tree = ET.parse(junit)
    counts: dict[str, dict[str, int]] = {}
    for case in tree.iter("testcase"):
        name = case.get("name", "")
        if case.find("skipped") is not None:
            continue
        params = re.findall(r"[\[-]([a-z0-9_]+)(?=[\]-])", name)
        arch = next((p for p in params if p in archs), "*")
        failed = case.find("failure") is not None or case.find("error") is not None
        row = counts.setdefault(arch, {"passed": 0, "failed": 0, "failures": []})  # type: ignore[dict-item]
        row["failed" if failed else "passed"] += 1
        if failed:
            row["failures"].append(f"{case.get('classname', '')}::{name}")  # type: ignore[attr-defined]
    return counts


def snapshot(path: Path, archs: list[str] | None = None, suites: bool = True) -> dict[str, Any]:
    """Write the snapshot of this environment to ``path`` (JSON) and return it."""
    from tools.arch_coverage import ARCHITECTURES, check

    archs = archs or list(ARCHITECTURES)
    coverage: dict[str, Any] = {}
    for arch in archs:
        for lora in (False, True):
            try:
                row = check(arch, lora=lora)
                coverage[f"{arch}{'+lora' if lora else ''}"] = (
                    "ok" if row.get("reload", "exact") in ("exact", "-") and row.get("diff", 0.0) <= 1e-5
                    else f"diff {row.get('diff'):.1e}, reload {row.get('reload')}"
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a failing architecture is a row of the table
                coverage[f"{arch}{'+lora' if lora else ''}"] = f"error: {type(e).__name__}: {str(e)[:160]}"
    snap = {"versions": _versions(), "structures": _structures(archs), "coverage": coverage,
            "suites": _suites(archs) if suites else {}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(snap, indent=1))
    return snap


def _suite_cell(snap: dict[str, Any], arch: str) -> str:
    row = snap["suites"].get(arch)
    if row is None:
        return "-"
    return f"{row['passed']} pass" + (f", **{row['failed']} fail**" if row["failed"] else "")


def _prunable_part(structure: str) -> list[str]:
    """The prunable pruning groups of a ``format_structure`` text, with their members."""
    out: list[str] = []
    keep = False
    for line in structure.splitlines():
        if line.startswith("  ") and not line.startswith("      "):
            keep = line.endswith("] prunable")
        elif not line.startswith("      "):
            keep = False
        if keep:
            out.append(line)
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, bool]:
    """The Markdown report of what changed from ``old`` to ``new``, and whether anything got worse."""
    lines = ["| package | pinned | newest |", "|---|---|---|"]
    lines += [f"| {p} | {old['versions'][p]} | {new['versions'][p]} |" for p in PACKAGES]
    lines += ["", "| architecture | groups (plain / LoRA) | coverage pinned | coverage newest | suites pinned | "
              "suites newest |", "|---|---|---|---|---|---|"]  # fmt: skip
    worse = False
    diffs: list[str] = []
    archs = sorted({k.split("+")[0] for k in new["structures"]} | {k.split("+")[0] for k in old["structures"]})
    for arch in archs + ["*"]:
        cells = []
        for key in (arch, f"{arch}+lora"):
            a, b = old["structures"].get(key), new["structures"].get(key)
            if a is None and b is None:
                continue
            if a == b:
                cells.append("same")
                continue
            if a is not None and b is not None and _prunable_part(a) == _prunable_part(b) and _prunable_part(a):
                cells.append("pinned groups changed")  # what prunes is the same: review, not a regression
            else:
                cells.append("**prunable groups changed**")
                worse = True
            diff = difflib.unified_diff((a or "").splitlines(), (b or "").splitlines(), "pinned", "newest", lineterm="")
            diffs.append(f"--- {key}\n" + "\n".join(list(diff)[:40]))
        cov = [old["coverage"].get(k, "-") for k in (arch, f"{arch}+lora")], \
              [new["coverage"].get(k, "-") for k in (arch, f"{arch}+lora")]  # fmt: skip
        cov_old, cov_new = (
            "-" if arch == "*" else "ok" if all(c == "ok" for c in cells_) else "; ".join(c for c in cells_ if c != "ok")
            for cells_ in cov
        )
        worse |= cov_old == "ok" and cov_new != "ok"
        s_old, s_new = old["suites"].get(arch, {}), new["suites"].get(arch, {})
        worse |= bool(s_new.get("failed", 0) > s_old.get("failed", 0))
        lines.append(f"| {arch} | {' / '.join(cells) or '-'} | {cov_old} | {cov_new} | {_suite_cell(old, arch)} | "
                     f"{_suite_cell(new, arch)} |")  # fmt: skip
    failures = [f for row in new["suites"].values() for f in row.get("failures", [])]
    if failures:
        lines += ["", "failing in the newest environment:", *[f"- {f}" for f in failures]]
    if diffs:
        lines += ["", "structure diffs (pinned -> newest):", "```", *diffs, "```"]
    verdict = ("worse: prunable groups, coverage or suites changed; fix before bumping constraints.txt" if worse
               else "green, with pinned groups to review in the diffs" if diffs
               else "green: the newest releases can be pinned in constraints.txt")  # fmt: skip
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines) + "\n", worse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot", help="record this environment's versions, structures, coverage and suites")
    s.add_argument("out", type=Path)
    s.add_argument("--archs", nargs="+", help="a subset of tools/arch_coverage.py's architectures")
    s.add_argument("--no-suites", action="store_true", help="skip the pytest suites")
    c = sub.add_parser("compare", help="print what changed between two snapshots")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    c.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    if args.cmd == "snapshot":
        snap = snapshot(args.out, args.archs, suites=not args.no_suites)
        print(f"snapshot of {snap['versions']} -> {args.out}")
        return 0
    text, worse = compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
