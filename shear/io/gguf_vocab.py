"""A transformers byte-level BPE tokenizer as GGUF vocabulary metadata (llama.cpp's ``gpt2`` model).

llama.cpp tokenizes with its own code, so the file must say which pre-tokenizer splits the text
before BPE (``tokenizer.ggml.pre``). It is named, not described, so the HF pre-tokenizer in
``tokenizer.json`` is matched against a small table of the ones llama.cpp implements; an
unknown one is refused rather than written as a guess that tokenizes differently.

Token types follow GGUF's ``TokenType``: special added tokens are CONTROL, other added tokens
USER_DEFINED, ids the vocabulary does not fill (the embedding has more rows than tokens) UNUSED
``[PAD<id>]`` entries, everything else NORMAL.

Example:
    >>> _pre_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
    'gpt-2'
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shear.errors import ExportError

__all__ = ["GgufVocab", "PRE_TOKENIZERS", "check_pre", "read_vocab"]

_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

PRE_TOKENIZERS: dict[str, str] = {
    "bytelevel(regex)": "gpt-2",
    "digits(individual)+bytelevel(regex)": "smollm",
    f"split({_LLAMA3_SPLIT})+bytelevel": "llama-bpe",
    f"split({_QWEN2_SPLIT})+bytelevel": "qwen2",
}
"""Canonical form of a ``tokenizer.json`` pre-tokenizer -> llama.cpp's ``tokenizer.ggml.pre`` name."""

_PRE_NAME = re.compile(r"[a-z0-9][a-z0-9.\-]{0,63}")
"""How llama.cpp spells its pre-tokenizer names (llama-bpe, gpt-2, a.x-4.0); it adds new ones often,
so a given name is checked for its spelling, not against a list that would refuse the newer ones."""


def check_pre(pre: object) -> str | None:
    """``pre`` when it is None or spelled like a llama.cpp pre-tokenizer name; else an :class:`ExportError`
    naming the value and the fix (text, a path or a newline never reaches the file's metadata).

    Example:
        >>> check_pre("llama-bpe")
        'llama-bpe'
        >>> check_pre("'; rm -rf /")
        Traceback (most recent call last):
        ...
        shear.errors.ExportError: pre="'; rm -rf /" is not a llama.cpp pre-tokenizer name; ...
    """
    if pre is None or (isinstance(pre, str) and _PRE_NAME.fullmatch(pre)):
        return pre
    shown = repr(pre) if len(repr(pre)) <= 60 else repr(pre)[:60] + "..."
    raise ExportError(
        f"pre={shown} is not a llama.cpp pre-tokenizer name; such a name is 1 to 64 lowercase letters, digits, '.' "
        "and '-' (e.g. llama-bpe, qwen2, gpt-2): give the one llama.cpp uses for this tokenizer (CLI: --pre), or "
        "leave it out to let shear tell it from tokenizer.json"
    )


def _pre_key(pre: dict[str, Any] | None) -> str:
    if pre is None:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "+".join(_pre_key(p) for p in pre.get("pretokenizers", []))
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return "bytelevel(prefix-space)"
        return "bytelevel(regex)" if pre.get("use_regex", True) else "bytelevel"
    if kind == "Digits":
        return "digits(individual)" if pre.get("individual_digits") else "digits"
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        return (
            f"split({regex})" if pre.get("behavior") == "Isolated" and not pre.get("invert") else "split(?)"
        )
    return str(kind)


def _pre_name(pre: dict[str, Any] | None) -> str | None:
    return PRE_TOKENIZERS.get(_pre_key(pre))


@dataclass(frozen=True)
class GgufVocab:
    """What GGUF's ``tokenizer.ggml.*`` keys hold, read from a transformers tokenizer."""

    pre: str
    """llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``)."""
    tokens: list[str]
    """One string per embedding row, id order."""
    types: list[int]
    """GGUF ``TokenType`` per token."""
    merges: list[str]
    """BPE merges as ``"left right"``, rank order."""
    special_ids: dict[str, int]
    """``bos``/``eos``/``unk``/``pad`` -> token id, where the tokenizer has them."""
    add_bos: bool
    """Whether encoding prepends the bos token."""
    add_eos: bool
    """Whether encoding appends the eos token."""
    chat_template: str | None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.types):
            raise ExportError(f"vocabulary: {len(self.tokens)} tokens but {len(self.types)} token types")
        for role, i in self.special_ids.items():
            if not 0 <= i < len(self.tokens):
                raise ExportError(
                    f"vocabulary: the {role} token id {i} is outside the {len(self.tokens)} tokens"
                )


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        from shear.io.remote_code import refuse_remote_code

        if Path(tokenizer).is_dir():
            refuse_remote_code(tokenizer)  # tokenizer_config.json's auto_map: transformers would offer to run it

        try:
            return AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ExportError(
                f"no tokenizer could be read from {str(tokenizer)!r} ({e}); pass the folder that "
                "holds tokenizer.json (tokenizer.save_pretrained writes it)"
            ) from e
    return tokenizer


def read_vocab(tokenizer: Any, n_vocab: int, *, pre: str | None = None) -> GgufVocab:
    """The GGUF vocabulary of ``tokenizer`` (a transformers fast tokenizer or a folder) for ``n_vocab`` rows.

    ``pre`` overrides the pre-tokenizer name when the table does not know the tokenizer's one.
    Raises :class:`ExportError` for what llama.cpp's BPE would tokenize differently (a non-BPE
    model, byte fallback, an unknown pre-tokenizer, more tokens than embedding rows).
    """
    tok = _load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise ExportError(
            f"{type(tok).__name__} is not a fast (tokenizers) tokenizer; GGUF export reads tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"the tokenizer is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''}; "
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM2, LLaMA 3, Qwen2). "
            "SentencePiece vocabularies (LLaMA 2, Mistral v0.1) are not supported yet"
        )
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ExportError(
            f"the tokenizer normalizes text ({normalizer.get('type')}); llama.cpp's BPE does not"
        )
    name = check_pre(pre) or _pre_name(spec.get("pre_tokenizer"))
    if name is None:
        raise ExportError(
            f"llama.cpp has no pre-tokenizer known to match this tokenizer's ({json.dumps(spec.get('pre_tokenizer'))}); "
            f"known: {sorted(set(PRE_TOKENIZERS.values()))}. Pass pre='<llama.cpp name>' if you know the right one"
        )

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: 1 for i in by_id}  # NORMAL
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(
            f"the tokenizer has token id {max(by_id)} but the model's embedding has only {n_vocab} rows; "
            "export with the tokenizer the model was trained with"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, 5) for i in range(n_vocab)]  # UNUSED where no token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    special: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{role}_token_id", None)
        if isinstance(i, int):
            special[role] = i
    probe = tok("a b")["input_ids"]
    add_bos = "bos" in special and bool(probe) and probe[0] == special["bos"]
    add_eos = "eos" in special and bool(probe) and probe[-1] == special["eos"]
    template = getattr(tok, "chat_template", None)
    return GgufVocab(
        pre=name,
        tokens=tokens,
        types=token_types,
        merges=merges,
        special_ids=special,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )
