"""Multiple-choice tasks built from held-out corpus text, for log-likelihood scoring.

- :func:`next_line_task`: a line (verse, verse line, sentence) of a document, the true next
  line and distractor lines from other documents of the same source;
- :func:`define_word_task`: a WordNet definition and four candidate words.

Built deterministically from the committed splits (same seed, same questions), so scores of a
model and of its pruned self are comparable.

Example:
    >>> items = next_line_task("kjv", "test", n=5)
    >>> len(items), len(items[0].options)
    (5, 4)
    >>> items[0].options[items[0].answer] != items[0].options[(items[0].answer + 1) % 4]
    True
"""

from __future__ import annotations

import random
import re

from shear.data.corpus import load_documents
from shear.errors import DataError
from shear.evaluation.choice import MultipleChoice

__all__ = ["MultipleChoice", "next_line_task", "define_word_task"]


def _lines(text: str) -> list[str]:
    """The lines of a document's body (after its title), stage directions dropped."""
    body = text.split("\n\n", 1)[-1] if "\n\n" in text else text
    return [ln.strip() for ln in body.split("\n") if ln.strip() and not ln.strip().startswith("[")]


def _answerable(line: str) -> bool:
    return 20 <= len(line) <= 200


def next_line_task(
    source: str, split: str = "test", *, n: int = 50, n_options: int = 4, seed: int = 0
) -> list[MultipleChoice]:
    """Pick the true next line among ``n_options``; the others are lines of other documents of ``source``.

    The context is up to three consecutive lines of one document; options are 20-200 characters.
    """
    rng = random.Random(f"{source}:{split}:{seed}")
    docs = [_lines(d.text) for d in load_documents(source, split)]
    pool = [(i, ln) for i, lines in enumerate(docs) for ln in lines if _answerable(ln)]
    candidates = [
        (i, j) for i, lines in enumerate(docs) for j in range(len(lines) - 1) if _answerable(lines[j + 1])
    ]
    if sum(1 for lines in docs if lines) < 2 or len(pool) < n_options or not candidates:
        raise DataError(
            f"{source}/{split}: too few multi-line documents for a next-line task; use kjv or shakespeare."
        )
    rng.shuffle(candidates)
    items = []
    for i, j in candidates[:n]:
        lines = docs[i]
        answer = lines[j + 1]
        others = sorted({ln for k, ln in pool if k != i and ln != answer})
        options = [answer, *rng.sample(others, n_options - 1)]
        rng.shuffle(options)
        context = "\n".join(lines[max(0, j - 2) : j + 1]) + "\n"
        items.append(MultipleChoice(context, tuple(options), options.index(answer), f"next-line-{source}"))
    return items


def define_word_task(
    split: str = "test", *, n: int = 50, n_options: int = 4, seed: int = 0
) -> list[MultipleChoice]:
    """Which word does this WordNet definition define? Distractors are words of other synsets."""
    rng = random.Random(f"wordnet:{split}:{seed}")
    entries = []
    for d in load_documents("wordnet", split):
        m = re.match(r"^(.*?) \((noun|verb|adjective|adverb)\): (.*?)\.?(\nExample:.*)?$", d.text, re.S)
        if m:
            entries.append((m.group(1).split(", ")[0], m.group(2), m.group(3)))
    if len(entries) < n_options:
        raise DataError(f"wordnet/{split}: too few synsets for a define-word task.")
    rng.shuffle(entries)
    items = []
    for word, pos, definition in entries[:n]:
        others = rng.sample([w for w, _, _ in entries if w != word], n_options - 1)
        options = [word, *others]
        rng.shuffle(options)
        context = f"Definition: {definition}.\nThe {pos} defined here is:"
        items.append(
            MultipleChoice(context, tuple(" " + o for o in options), options.index(word), "define-word")
        )
    return items
