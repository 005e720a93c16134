"""Tokens/s of a GGUF file in llama.cpp, through ``llama-cpp-python`` when it is installed.

llama.cpp is where many pruned models are served; its speed follows its own kernels (k-quants pack
rows in blocks of 256), not torch's. :func:`gguf_speed` loads a GGUF file and times **prompt eval**
(one ``eval`` of a ``prompt_tokens`` prompt) and **generation** (``new_tokens`` one-token evals after
it), medians of ``repeats`` after a warm-up, on ``threads`` CPU threads. ``llama-cpp-python`` is
not a shear dependency: without it :func:`require_llama_cpp` raises a :class:`ModelLoadError` that
says how to install it.

Example:
    >>> rates = gguf_speed("pruned.Q4_K_M.gguf", prompt_tokens=64, new_tokens=16)   # doctest: +SKIP
    >>> sorted(rates)                                                                 # doctest: +SKIP
    ['llama.cpp generation b1', 'llama.cpp prompt eval b1']
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import torch

from shear.errors import InputError, ModelLoadError
from shear.evaluation.throughput import Outcome
from shear.evaluation.timing import median_seconds

__all__ = ["INSTALL_HINT", "require_llama_cpp", "gguf_speed", "check_gguf_file"]

INSTALL_HINT = "pip install llama-cpp-python"
"""The command that installs llama.cpp's Python binding (it builds llama.cpp from source)."""


def require_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module; a :class:`ModelLoadError` naming the install command when it is missing."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError as e:
        raise ModelLoadError(
            f"measuring GGUF files needs llama.cpp's Python binding, which is not installed ({e}); "
            f"install it with `{INSTALL_HINT}` (it compiles llama.cpp, a few minutes), or leave out --gguf"
        ) from e


def check_gguf_file(path: str | os.PathLike[str], option: str = "--gguf") -> Path:
    """``path`` as a Path when it is a readable GGUF file, else an :class:`InputError` naming ``option``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{option} {path}: no such file; give a .gguf file (shear export MODEL -o FILE.gguf writes one)")
    with p.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"{option} {path}: not a GGUF file (it does not start with 'GGUF'); give a .gguf file")
    return p


def gguf_speed(
    path: str | os.PathLike[str],
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 8,
    repeats: int = 2,
    threads: int | None = None,
) -> dict[str, Outcome]:
    """``{"llama.cpp prompt eval b1": tokens/s, "llama.cpp generation b1": tokens/s}`` of the GGUF
    file at ``path`` (random, seeded prompt ids), on ``threads`` threads (default: torch's)."""
    llama_cpp = require_llama_cpp()
    file = check_gguf_file(path)
    try:
        llm = llama_cpp.Llama(model_path=str(file), n_ctx=prompt_tokens + new_tokens + 8, n_batch=max(prompt_tokens, 8),
                              n_threads=threads or torch.get_num_threads(), verbose=False)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - llama.cpp's own failure, named with the file
        raise ModelLoadError(f"llama.cpp could not load {file}: {type(e).__name__}: {e}") from e
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(llm.n_vocab()), (prompt_tokens,), generator=gen).tolist()

    def prompt() -> None:
        llm.eval(ids)

    def generate() -> None:
        for _ in range(new_tokens):
            llm.eval(ids[-1:])

    def fresh_prompt() -> None:
        llm.reset()
        llm.eval(ids)

    try:
        rates: dict[str, Outcome] = {
            "llama.cpp prompt eval b1": prompt_tokens / median_seconds(prompt, repeats, setup=llm.reset),
            "llama.cpp generation b1": new_tokens / median_seconds(generate, repeats, setup=fresh_prompt),
        }
    finally:
        close = getattr(llm, "close", None)
        if callable(close):
            close()
    return rates
