"""The held-out set the quality verdict measures: text, the bundled multiple-choice tasks, fixed prompts.

The text is, in this order of preference, the validation split of the data a run was given (a
``TextData``), a folder of ``<source>.validation.txt`` files (``shear eval --data DIR``), or the
bundled corpus's validation split; the :class:`~shear.evaluation.quality.HeldOut` says which. The
tasks are built from the bundled corpus's *test* split (no pass trains or selects on it), so a
dense model and its pruned self answer the same questions.

Example:
    >>> from shear.zoo import load_tiny_llama
    >>> tok = load_tiny_llama().tokenizer
    >>> held = held_out(tok)
    >>> held.origin
    "the bundled corpus's validation split"
    >>> sorted(held.tasks), len(held.tasks["define-word"]), held.texts["kjv"].numel() >= 256
    (['define-word', 'next-line-shakespeare'], 16, True)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from shear.data.corpus import load_corpus, load_text
from shear.data.readers import read_text
from shear.data.sources import SOURCE_NAMES
from shear.data.tasks import define_word_task, next_line_task
from shear.errors import DataError
from shear.evaluation.choice import MultipleChoice
from shear.evaluation.quality import EvalSize, HarnessRun, HeldOut, eval_size

__all__ = ["BUNDLED_TASKS", "bundled_tasks", "held_out", "held_out_texts", "read_validation_folder"]

BUNDLED_TASKS: dict[str, Callable[[int], list[MultipleChoice]]] = {
    "define-word": lambda n: define_word_task("test", n=n),
    "next-line-kjv": lambda n: next_line_task("kjv", "test", n=n),
    "next-line-shakespeare": lambda n: next_line_task("shakespeare", "test", n=n),
}
"""shear's own multiple-choice tasks by name: ``n`` items from the corpus's test split (deterministic)."""

_CHARS_PER_TOKEN = 8
"""Corpus characters read per held-out token wanted (English text runs 3-5 characters per token)."""


def bundled_tasks(size: str | bool | EvalSize = "quick") -> dict[str, list[MultipleChoice]]:
    """The bundled tasks a size scores, with its item counts."""
    return {name: BUNDLED_TASKS[name](n) for name, n in eval_size(size).tasks}


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _is_bundled(validation: Mapping[str, torch.Tensor], tokenizer: Any) -> bool:
    """Whether a TextData's validation split is the bundled corpus's (its sources start with its text)."""
    if tokenizer is None or not validation or not set(validation) <= set(SOURCE_NAMES):
        return False
    for name, ids in validation.items():
        prefix = _tokenize(tokenizer, load_text(name, "validation", max_chars=200))[:-2]  # the cut may split a word
        if ids.numel() < prefix.numel() or not torch.equal(ids[: prefix.numel()], prefix):
            return False
    return True


def held_out_texts(
    tokenizer: Any,
    texts: Mapping[str, str],
    *,
    size: str | bool | EvalSize = "quick",
    origin: str,
    harness: HarnessRun | None = None,
) -> HeldOut:
    """A :class:`HeldOut` of ``{source: held-out text}``, the bundled tasks (or ``harness``) and the prompts.

    An empty text is a :class:`DataError` naming the source (perplexity needs tokens).
    """
    ids = {}
    for name, text in texts.items():
        ids[name] = _tokenize(tokenizer, text)
        if ids[name].numel() < 2:
            raise DataError(
                f"held-out source {name!r} ({origin}) is empty ({ids[name].numel()} tokens); the quality verdict "
                "measures perplexity on it: give it a few paragraphs of held-out text, or remove it"
            )
    return HeldOut(tokenizer, ids, origin, {} if harness else bundled_tasks(size), harness=harness)


def held_out(source: Any, *, size: str | bool | EvalSize = "quick", harness: HarnessRun | None = None) -> HeldOut:
    """The held-out set for ``source``: a ``TextData`` (its validation split, else the bundled corpus's)
    or a tokenizer (the bundled corpus's validation split).

    Example:
        >>> held_out(TextData.from_corpus(tok, max_train_chars=10_000)).origin   # doctest: +SKIP
        "the bundled corpus's validation split"
    """
    s = eval_size(size)
    is_data = hasattr(source, "validation") and hasattr(source, "train")
    tokenizer = source.tokenizer if is_data else source
    validation = dict(source.validation) if is_data else {}
    if validation:
        origin = (
            "the bundled corpus's validation split" if _is_bundled(validation, tokenizer)
            else f"the validation split of the data given ({', '.join(validation)})"
        )  # fmt: skip
        notes = []
        if tokenizer is None:
            notes.append("no multiple-choice tasks and no generations: the data has no tokenizer (TextData.tokenizer)")
            return HeldOut(None, validation, origin, notes=notes)
        return HeldOut(tokenizer, validation, origin, {} if harness else bundled_tasks(s), harness=harness)
    if tokenizer is None or not callable(tokenizer):
        got = "a TextData without a tokenizer or a validation split" if is_data else type(source).__name__
        raise DataError(
            f"held-out text needs a tokenizer for the bundled corpus, or data with a validation split; got {got}. "
            "Pass TextData.from_texts(tokenizer, train, validation) or the model's tokenizer"
        )
    texts = load_corpus("validation", max_chars=s.tokens * _CHARS_PER_TOKEN)
    origin = "the bundled corpus's validation split" + (" (the data given has none)" if is_data else "")
    return held_out_texts(tokenizer, texts, size=s, origin=origin, harness=harness)


def read_validation_folder(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{source: text}`` of a folder's ``<source>.validation.txt`` files (the layout ``--data`` reads).

    A folder without any, or an empty one, is a :class:`DataError` that says what to put there.
    """
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"--data {folder}: not a folder; give a folder of <source>.validation.txt files, or 'corpus'")
    files = sorted(path.glob("*.validation.txt"))
    if not files:
        raise DataError(
            f"--data {folder}: no <source>.validation.txt files there; the evaluation reads held-out text only: "
            "add one (e.g. mytext.validation.txt) or use --data corpus"
        )
    texts = {f.name[: -len(".validation.txt")]: read_text(f) for f in files}
    for name, text in texts.items():
        if not text.strip():
            raise DataError(
                f"--data {folder}: {name}.validation.txt is empty (the validation split of {name!r}); put a few "
                "paragraphs of held-out text in it, or remove it"
            )
    return texts
