"""The committed multi-source corpus: documents, joined text per source, integrity checks.

Example:
    >>> docs = load_documents("kjv", "validation")
    >>> docs[0].source, docs[0].id.split()[0] in {"Genesis", "Exodus"} or True
    ('kjv', True)
    >>> text = load_text("wordnet", "test", max_chars=200)
    >>> len(text) <= 200
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import NamedTuple

from shear.data.layout import corpus_file, data_root, manifest_file
from shear.data.readers import read_jsonl
from shear.data.sources import SOURCE_NAMES
from shear.errors import DataError

__all__ = ["Document", "load_documents", "load_text", "load_corpus", "verify_data", "DOC_SEPARATOR"]

DOC_SEPARATOR = "\n\n"
"""Documents of one source are joined with a blank line for language-model evaluation."""


class Document(NamedTuple):
    """One document of a corpus source."""

    source: str
    id: str
    text: str


def load_documents(source: str, split: str) -> list[Document]:
    """All documents of ``source`` in ``split``, in corpus order."""
    path = corpus_file(source, split)
    out = []
    for i, r in enumerate(read_jsonl(path)):
        if not isinstance(r.get("id"), str) or not isinstance(r.get("text"), str):
            raise DataError(
                f"{path}: record {i} lacks a string 'id' and 'text'; rebuild with tools/build_corpus.py."
            )
        out.append(Document(source, r["id"], r["text"]))
    if not out:
        raise DataError(f"{path}: no documents; rebuild with `python -m tools.build_corpus`.")
    return out


def load_text(source: str, split: str, *, max_chars: int | None = None) -> str:
    """The documents of ``source``/``split`` joined by blank lines, cut at ``max_chars`` if given."""
    text = DOC_SEPARATOR.join(d.text for d in load_documents(source, split))
    return text if max_chars is None else text[:max_chars]


def load_corpus(
    split: str, sources: Iterable[str] | None = None, *, max_chars: int | None = None
) -> dict[str, str]:
    """``{source: joined text}`` for ``split``, over all sources (report order) or the named ones.

    Example:
        >>> sorted(load_corpus("test", ["kjv", "jargon"], max_chars=50))
        ['jargon', 'kjv']
    """
    names = list(SOURCE_NAMES if sources is None else sources)
    return {name: load_text(name, split, max_chars=max_chars) for name in names}


def verify_data() -> list[str]:
    """Compare every file listed in MANIFEST.json with its recorded SHA-256; return the mismatches."""
    path = manifest_file()
    if not path.is_file():
        raise DataError(f"{path}: missing; rebuild the data with `python -m tools.build_corpus`.")
    manifest = json.loads(path.read_text())
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        file = data_root() / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
            continue
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}... != recorded {entry['sha256'][:16]}...")
    return problems
