"""Alpaca-style instruction records built from the corpus documents (used by build_corpus.py).

Every record comes from one corpus document and inherits that document's split, so held-out
instructions never share text with training documents. Tasks:

- ``define``: a WordNet word and part of speech -> its gloss;
- ``use-in-sentence``: a WordNet word -> WordNet's own example sentence;
- ``next-verse``: a KJV verse -> the verse that follows it;
- ``continue-speech``: a Shakespeare speech or stanza -> the one that follows it;
- ``explain-jargon``: a Jargon File term -> the first paragraph of its entry;
- ``title-section``: a paragraph of the Python documentation -> its section heading.

Example:
    >>> recs = instructions_for("kjv", "Genesis 1", "Genesis 1\\n\\nIn the beginning.\\nAnd the earth.")
    >>> recs[0]["output"]
    'And the earth.'
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["instructions_for", "TASKS", "rank"]

TASKS = ("define", "use-in-sentence", "next-verse", "continue-speech", "explain-jargon", "title-section")


def rank(*key: str) -> int:
    """A deterministic pseudo-random rank for sampling (SHA-256 of the key parts)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(key).encode()).digest()[:8], "big")


def _record(
    task: str, source: str, doc_id: str, instruction: str, input_: str, output: str
) -> dict[str, str]:
    return {
        "instruction": instruction,
        "input": input_,
        "output": output,
        "task": task,
        "source": source,
        "doc_id": doc_id,
    }


def instructions_for(source: str, doc_id: str, text: str) -> list[dict[str, str]]:
    """All candidate instruction records of one document (the builder samples from them)."""
    out: list[dict[str, str]] = []
    if source == "wordnet":
        head, _, rest = text.partition(": ")
        words, _, pos = head.rpartition(" (")
        pos = pos.rstrip(")")
        word = words.split(", ")[0]
        definition, _, example = rest.partition("\nExample: ")
        out.append(
            _record("define", source, doc_id, "Define the following word.", f"{word} ({pos})", definition)
        )
        first = example.split(" / ")[0].strip()
        if first and word.lower() in first.lower():
            out.append(
                _record(
                    "use-in-sentence",
                    source,
                    doc_id,
                    "Use the following word in a short phrase or sentence.",
                    word,
                    first,
                )  # fmt: skip
            )
    elif source == "kjv":
        title, _, body = text.partition("\n\n")
        verses = [v for v in body.split("\n") if v]
        for i in range(len(verses) - 1):
            out.append(
                _record(
                    "next-verse",
                    source,
                    f"{doc_id}:{i + 1}",
                    f"Continue this passage from the King James Bible ({title}) with the verse that follows.",
                    verses[i],
                    verses[i + 1],
                )  # fmt: skip
            )
    elif source == "shakespeare":
        paras = [p for p in text.split("\n\n") if p.strip() and not p.startswith("[")]
        for i in range(len(paras) - 1):
            if 40 <= len(paras[i]) <= 800 and 40 <= len(paras[i + 1]) <= 800:
                out.append(
                    _record(
                        "continue-speech",
                        source,
                        f"{doc_id}:{i}",
                        "Continue this passage from Shakespeare with the speech or stanza that follows.",
                        paras[i],
                        paras[i + 1],
                    )  # fmt: skip
                )
    elif source == "jargon":
        head, _, body = text.partition("\n\n")
        term = doc_id.split("#")[0]
        first = body.split("\n\n")[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).replace("\n", " ").strip()
        if 40 <= len(first) <= 1200:
            out.append(
                _record(
                    "explain-jargon",
                    source,
                    doc_id,
                    "Explain what this term means in hacker jargon.",
                    term,
                    first,
                )  # fmt: skip
            )
    elif source == "pydocs":
        title = text.split("\n", 1)[0].strip()
        paras = [p for p in text.split("\n\n")[1:] if 200 <= len(p) <= 1200 and not p.startswith(" ")]
        if paras and 3 <= len(title) <= 80:
            out.append(
                _record(
                    "title-section",
                    source,
                    doc_id,
                    "Give the heading of the section of the Python documentation this paragraph comes from.",
                    paras[0].replace("\n", " "),
                    title,
                )  # fmt: skip
            )
    return out
