"""Alpaca-style instruction data: the committed set, user JSONL files, the prompt template.

A record has ``instruction``, ``input`` (may be empty) and ``output``. :func:`format_prompt`
renders the Alpaca prompt; :func:`tokenize_instruction` gives ``input_ids`` and ``labels`` with
the prompt masked (``-100``), so a recovery loop trains on the response only.

Example:
    >>> rec = Instruction("Define the following word.", "cat (noun)", "a small feline.")
    >>> print(format_prompt(rec).splitlines()[-1])
    ### Response:
    >>> len(load_instructions("validation")) > 100
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

from shear.data.layout import instructions_file
from shear.data.readers import read_jsonl
from shear.errors import DataError

__all__ = [
    "Instruction",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "format_prompt",
    "load_instructions",
    "tokenize_instruction",
]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""The Alpaca prompt for records with an input."""
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""The Alpaca prompt for records without an input."""


class Instruction(NamedTuple):
    """One instruction record (``task``/``source`` are set for shear's own set, else empty)."""

    instruction: str
    input: str
    output: str
    task: str = ""
    source: str = ""


def format_prompt(record: Instruction) -> str:
    """The Alpaca prompt for ``record`` (without the response)."""
    template = ALPACA_PROMPT if record.input else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=record.instruction, input=record.input)


def _parse(records: list[dict[str, Any]], where: str) -> list[Instruction]:
    out = []
    for i, r in enumerate(records):
        missing = [k for k in ("instruction", "output") if not isinstance(r.get(k), str) or not r[k]]
        if missing or not isinstance(r.get("input", ""), str):
            raise DataError(
                f"{where}: record {i} lacks a non-empty string {', '.join(missing) or 'input'}; Alpaca "
                f"records need 'instruction', 'output' and optionally 'input' (strings)."
            )
        out.append(
            Instruction(
                r["instruction"], r.get("input", ""), r["output"], r.get("task", ""), r.get("source", "")
            )
        )
    return out


def load_instructions(
    split: str = "train",
    *,
    path: str | os.PathLike[str] | None = None,
    tasks: Iterable[str] | None = None,
) -> list[Instruction]:
    """Shear's committed instruction set for ``split``, or an Alpaca JSONL file at ``path``.

    ``tasks`` keeps only records of those tasks (see shear/data/DATA_CARD.md for the list).
    """
    file = instructions_file(split) if path is None else path
    records = _parse(read_jsonl(file), str(file))
    if tasks is not None:
        wanted = set(tasks)
        records = [r for r in records if r.task in wanted]
    if not records:
        raise DataError(
            f"{file}: no instruction records{' for tasks ' + str(sorted(tasks)) if tasks else ''}."
        )
    return records


def tokenize_instruction(
    record: Instruction, tokenizer: Any, *, max_length: int = 512
) -> dict[str, list[int]]:
    """``input_ids``/``labels`` for causal-LM training on the response; the prompt is masked with -100.

    The response ends with the tokenizer's EOS token; sequences are cut at ``max_length``.
    """
    prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    response = tokenizer(record.output, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    labels = ([-100] * len(prompt) + response)[:max_length]
    return {"input_ids": ids, "labels": labels}
