"""Data for pruning, recovery and evaluation: the committed corpus, instructions, file readers.

The corpus has five named sources (``kjv``, ``shakespeare``, ``wordnet``, ``jargon``,
``pydocs``), each split by document into train/validation/test; see shear/data/DATA_CARD.md.

Example:
    >>> from shear.data import load_corpus, load_instructions, SOURCE_NAMES
    >>> texts = load_corpus("validation")
    >>> sorted(texts) == sorted(SOURCE_NAMES)
    True
"""

from __future__ import annotations

from shear.data.corpus import DOC_SEPARATOR, Document, load_corpus, load_documents, load_text, verify_data
from shear.data.heldout import BUNDLED_TASKS, held_out, held_out_texts, read_validation_folder
from shear.data.instructions import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    Instruction,
    format_prompt,
    load_instructions,
    tokenize_instruction,
)
from shear.data.layout import DATA_ENV, corpus_file, data_root, instructions_file, manifest_file
from shear.data.readers import read_bytes, read_jsonl, read_text
from shear.data.sources import SOURCE_NAMES, SOURCES, SPLITS, SourceInfo
from shear.data.tasks import MultipleChoice, define_word_task, next_line_task
from shear.data.text import TextData, require_text_data
from shear.evaluation import window_perplexity

__all__ = [
    "ALPACA_PROMPT",
    "BUNDLED_TASKS",
    "ALPACA_PROMPT_NO_INPUT",
    "DATA_ENV",
    "DOC_SEPARATOR",
    "Document",
    "Instruction",
    "MultipleChoice",
    "SOURCES",
    "SOURCE_NAMES",
    "SPLITS",
    "SourceInfo",
    "TextData",
    "corpus_file",
    "data_root",
    "define_word_task",
    "format_prompt",
    "held_out",
    "held_out_texts",
    "instructions_file",
    "load_corpus",
    "load_documents",
    "load_instructions",
    "load_text",
    "manifest_file",
    "next_line_task",
    "read_bytes",
    "read_jsonl",
    "read_text",
    "read_validation_folder",
    "require_text_data",
    "tokenize_instruction",
    "verify_data",
    "window_perplexity",
]
