"""Tokenized, named text for passes: calibration windows, training tokens and per-source perplexity.

Passes that need data (saliency, knowledge-distribution, lhspg, the baselines, recovery, EBFT) read
a :class:`TextData` from ``ctx.data`` (``shear.compile(model, data=...)``). It holds token ids per
named source for training and validation, and optionally tokenized instruction records (loss on
the response only), so that recovery can weigh sources by how much each one degraded.

Example:
    >>> from shear.data import TextData
    >>> data = TextData.from_corpus(tokenizer, max_train_chars=20_000)      # doctest: +SKIP
    >>> data.calibration(8, 128).shape                                      # doctest: +SKIP
    torch.Size([8, 128])
    >>> data.perplexity(model, max_windows=4)                               # doctest: +SKIP
    {'kjv': 21.3, 'shakespeare': 39.0, ...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from shear.errors import DataError
from shear.evaluation.perplexity import window_perplexity

__all__ = ["TextData", "HasData", "calibration_ids", "require_text_data"]


class HasData(Protocol):
    """What the pass helpers below read of a pass context: its ``data`` (a pass's ``Context`` has it).
    Data sits below the passes, so it names this much of a context and not the class."""

    @property
    def data(self) -> Any: ...


def _tokenize(tokenizer: Any, text: str, name: str) -> torch.Tensor:
    if not isinstance(text, str):
        hint = " decode it first (text.decode('utf-8'))" if isinstance(text, (bytes, bytearray)) else " give its text"
        raise DataError(f"source {name!r}: text must be a str, got {type(text).__name__};{hint}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"source {name!r}: its text gives {len(ids)} tokens; give it at least a few sentences.")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TextData:
    """Token ids per named source (train and validation) and optional instruction examples."""

    tokenizer: Any
    """The model's tokenizer (a transformers ``PreTrainedTokenizerBase``); ``None`` for id-only data."""
    train: dict[str, torch.Tensor]
    """Source name -> 1-D long tensor of training token ids."""
    validation: dict[str, torch.Tensor] = field(default_factory=dict)
    """Source name -> 1-D long tensor of held-out token ids (perplexity, knowledge distribution)."""
    instructions: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Tokenized instruction examples ``(input_ids, labels)``; labels are -100 on the prompt."""
    instructions_val: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.train:
            raise DataError("TextData needs at least one training source; got none.")
        for split, table in (("train", self.train), ("validation", self.validation)):
            for name, ids in table.items():
                if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.long:
                    raise DataError(
                        f"TextData.{split}[{name!r}] must be a 1-D long tensor of token ids; "
                        "use TextData.from_texts to tokenize text."
                    )

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        tokenizer: Any,
        train: Mapping[str, str],
        validation: Mapping[str, str] | None = None,
    ) -> TextData:
        """Tokenize ``{source: text}`` mappings (no special tokens added).

        Example:
            >>> data = TextData.from_texts(tok, {"a": "some text ..."}, {"a": "held out"})  # doctest: +SKIP
        """
        return cls(
            tokenizer,
            {name: _tokenize(tokenizer, text, name) for name, text in train.items()},
            {name: _tokenize(tokenizer, text, name) for name, text in (validation or {}).items()},
        )

    @classmethod
    def from_corpus(
        cls,
        tokenizer: Any,
        *,
        sources: Iterable[str] | None = None,
        max_train_chars: int | None = 400_000,
        max_val_chars: int | None = None,
        instructions: int = 0,
        instruction_max_length: int = 256,
    ) -> TextData:
        """The committed corpus (shear/data/DATA_CARD.md): train and validation splits per source.

        ``max_train_chars`` bounds the text tokenized per source (the full train split is ~2 MB per
        source); ``instructions`` > 0 also tokenizes that many instruction records (and up to a
        tenth as many, at least 16, held-out ones).
        """
        from shear.data.corpus import load_corpus
        from shear.data.instructions import load_instructions, tokenize_instruction

        names = None if sources is None else list(sources)
        data = cls.from_texts(
            tokenizer,
            load_corpus("train", names, max_chars=max_train_chars),
            load_corpus("validation", names, max_chars=max_val_chars),
        )
        if instructions > 0:

            def encode(split: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
                out = []
                for record in load_instructions(split)[:n]:
                    t = tokenize_instruction(record, tokenizer, max_length=instruction_max_length)
                    out.append((torch.tensor(t["input_ids"]), torch.tensor(t["labels"])))
                return out

            data.instructions = encode("train", instructions)
            data.instructions_val = encode("validation", max(16, instructions // 10))
        return data

    # -- views ----------------------------------------------------------------------------------

    @property
    def sources(self) -> list[str]:
        """Training source names, in order."""
        return list(self.train)

    def calibration(
        self, n: int, seq_len: int, *, seed: int = 0, sources: Iterable[str] | None = None
    ) -> torch.Tensor:
        """``[n, seq_len]`` random training windows, sources taken round-robin (seeded).

        Raises DataError when a source is shorter than ``seq_len`` tokens.
        """
        if n <= 0 or seq_len <= 0:
            raise DataError(f"calibration needs n > 0 and seq_len > 0, got n={n}, seq_len={seq_len}")
        names = list(self.train if sources is None else sources)
        for name in names:
            if name not in self.train:
                raise DataError(f"no training source {name!r}; have {sorted(self.train)}")
            if self.train[name].numel() < seq_len:
                raise DataError(
                    f"source {name!r} has {self.train[name].numel()} training tokens, fewer than "
                    f"seq_len={seq_len}; lower seq_len or give more text."
                )
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for i in range(n):
            ids = self.train[names[i % len(names)]]
            start = int(torch.randint(0, ids.numel() - seq_len + 1, (1,), generator=gen))
            rows.append(ids[start : start + seq_len])
        return torch.stack(rows)

    def eval_windows(self, source: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
        """Non-overlapping ``[w, seq_len]`` windows of ``source``'s validation ids (first ones first)."""
        if source not in self.validation:
            raise DataError(
                f"no validation text for source {source!r}; have {sorted(self.validation)} "
                "(TextData.from_texts takes a validation mapping)"
            )
        ids = self.validation[source]
        w = ids.numel() // seq_len
        if max_windows is not None:
            w = min(w, max_windows)
        if w == 0:
            raise DataError(
                f"validation source {source!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
                "lower seq_len or give more held-out text."
            )
        return ids[: w * seq_len].view(w, seq_len)

    def perplexity(
        self,
        model: nn.Module,
        *,
        seq_len: int = 256,
        max_windows: int | None = None,
        sources: Iterable[str] | None = None,
        batch_size: int = 4,
    ) -> dict[str, float]:
        """Per-source perplexity on non-overlapping validation windows (fast; for analysis passes).

        For reported numbers use :func:`shear.evaluation.evaluate_perplexity`
        (sliding windows with context); this one scores every token of each window
        (:func:`shear.evaluation.window_perplexity`).
        """
        names = list(self.validation if sources is None else sources)
        if not names:
            raise DataError("TextData has no validation sources; pass validation texts to measure perplexity.")
        return {
            name: window_perplexity(model, self.eval_windows(name, seq_len, max_windows), batch_size=batch_size)
            for name in names
        }

    def held_out(self, size: Any = "quick") -> Any:
        """The quality verdict's held-out set (:func:`shear.data.heldout.held_out`): this data's
        validation split, else the bundled corpus's, with the bundled tasks and prompts."""
        from shear.data.heldout import held_out

        return held_out(self, size=size)


def require_text_data(ctx: HasData, pass_name: str) -> TextData:
    """``ctx.data`` as a :class:`TextData`, or a DataError that says how to pass one.

    Example:
        >>> from shear.passes.base import Context
        >>> require_text_data(Context(model=nn.Linear(2, 2)), "wanda")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        shear.errors.DataError: pass 'wanda' needs text data: ...
    """
    data = ctx.data
    if isinstance(data, TextData):
        return data
    got = "nothing" if data is None else type(data).__name__
    raise DataError(
        f"pass {pass_name!r} needs text data: call shear.compile(model, passes, data=TextData.from_corpus(tokenizer)) "
        f"(or TextData.from_texts(tokenizer, {{'name': text}}, {{'name': held_out_text}})); got {got}."
    )


def calibration_ids(ctx: HasData, pass_name: str, nsamples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` calibration ids for a pass: ``ctx.data`` itself when it is a ``[n, L]`` long
    tensor, else ``nsamples`` seeded windows of the :class:`TextData` in ``ctx.data``.

    Example:
        >>> from shear.passes.base import Context
        >>> ids = torch.ones(2, 8, dtype=torch.long)
        >>> calibration_ids(Context(model=nn.Linear(2, 2), data=ids), "wanda", 32, 128).shape
        torch.Size([2, 8])
    """
    data = ctx.data
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long or data.shape[0] == 0:
            raise DataError(
                f"pass {pass_name!r}: calibration ids given as a tensor must be [n, seq_len] long, got "
                f"{tuple(data.shape)} {data.dtype}"
            )
        return data
    return require_text_data(ctx, pass_name).calibration(nsamples, seq_len, seed=seed)
