"""Run a GGUF file in llama.cpp from Python: all-position logits, greedy decoding, tokenization.

Needs numpy and ``llama-cpp-python`` (``import llama_cpp``; it builds llama.cpp from source when
installed), neither a shear dependency, and nothing else, so it can run in the interpreter of a
separate virtual environment (``python -m tools.gguf_check`` calls it that way with ``--client-python``).

As a script it reads a JSON request and writes a JSON answer::

    python tools/llama_cpp_client.py request.json answer.json

request: ``{"gguf": path, "logits_ids": [...], "prompt_ids": [...], "new": 32, "text": "...",
"threads": 2}``, optionally ``"quantize": {"out": path, "ftype": "Q4_K_M"}`` to quantize first
and run the quantized file, and ``"speed": {"prompt": 128, "new": 32, "repeats": 3}`` to time
prompt evaluation and generation in a second instance that keeps only the last logits (what a server
does); answer: ``{"client": ..., "logits": file.npy, "greedy": [...], "greedy_s": seconds, "tokens": [...]}``
(the logits array is written next to the answer), plus ``"speed": {"prompt_tok_s", "gen_tok_s"}``
(medians of the repeats).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["open_client"]


class _LlamaCppPython:
    name = "llama-cpp-python"

    def __init__(self, path: str, n_ctx: int, threads: int) -> None:
        import llama_cpp

        self.version = llama_cpp.__version__
        self.llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                                   n_threads=threads, verbose=False)  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)  # scores is reused by later evals

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            self.llm.eval([tok])
        return out

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=False))


def open_client(path: str, *, n_ctx: int = 512, threads: int = 2) -> Any:
    """llama.cpp with ``path`` loaded (all-position logits kept)."""
    return _LlamaCppPython(path, n_ctx, threads)


def quantize(source: str, target: str, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``), e.g. ``ftype="Q4_K_M"``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize({source} -> {ftype}) failed")


def speed(path: str, ids: list[int], new: int, repeats: int, threads: int) -> dict[str, float]:
    """Median prompt-evaluation and generation tokens/s of ``path`` (``ids`` as the prompt, ``new``
    greedy tokens after it), in an instance that keeps only the last position's logits."""
    import statistics

    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + new + 8, n_batch=len(ids), n_threads=threads,
                          verbose=False)  # fmt: skip
    prompt_s, gen_s = [], []
    for _ in range(repeats + 1):  # the first round warms caches and is dropped
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new):
            llm.eval([int(np.argmax(llm.eval_logits[-1]))])  # the last logits (no all-position scores here)
        t2 = time.perf_counter()
        prompt_s.append(t1 - t0)
        gen_s.append(t2 - t1)
    return {"prompt_tok_s": len(ids) / statistics.median(prompt_s[1:]), "gen_tok_s": new / statistics.median(gen_s[1:])}


def main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    answer_path = Path(argv[1])
    if request.get("quantize"):
        q = request["quantize"]
        quantize(request["gguf"], q["out"], q["ftype"], request.get("threads", 2))
        request["gguf"] = q["out"]
    ids, prompt = request["logits_ids"], request["prompt_ids"]
    if request.get("speed"):  # timing only: no all-position logits, nothing else measured
        sp = request["speed"]
        answer_path.write_text(json.dumps({"speed": speed(request["gguf"], ids[: sp["prompt"]], sp["new"],
                                                          sp["repeats"], request.get("threads", 2))}))
        return 0
    client = open_client(request["gguf"], n_ctx=max(512, len(ids) + 8, len(prompt) + request["new"] + 8),
                         threads=request.get("threads", 2))  # fmt: skip
    logits = client.logits(ids)
    t0 = time.perf_counter()
    greedy = client.greedy(prompt, request["new"])
    greedy_s = time.perf_counter() - t0
    np.save(answer_path.with_suffix(".npy"), logits)
    answer = {
        "client": f"{client.name} {client.version}",
        "logits": str(answer_path.with_suffix(".npy")),
        "greedy": greedy,
        "greedy_s": greedy_s,
        "tokens": client.tokenize(request.get("text", "")),
    }
    answer_path.write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
