"""Perplexity of a causal LM: over text with a sliding window (reported numbers), and over
non-overlapping token windows (:func:`window_perplexity`, the fast measure analysis passes use
through ``TextData.perplexity``). Both score windows through one function, :func:`nll_sum`.

Each window sees up to ``window`` tokens; only the tokens not scored by an earlier window are
scored (so every token but the first is scored exactly once, with at least ``window - stride``
tokens of context after the first window). ``stride == window`` gives (almost) disjoint chunks, fastest;
``stride == window // 2`` (default) doubles the cost and the context of the scored tokens.

Example:
    >>> from shear.data import load_corpus                                     # doctest: +SKIP
    >>> report = evaluate_perplexity(model, tokenizer, load_corpus("validation"))   # doctest: +SKIP
    >>> print(report.table())                                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shear.errors import DataError
from shear.model.devices import model_device

__all__ = [
    "PerplexityResult",
    "PerplexityReport",
    "perplexity",
    "perplexity_ids",
    "evaluate_perplexity",
    "sliding_windows",
    "forward_tokens",
    "window_perplexity",
    "nll_sum",
]

ProgressCallback = Callable[[int], None]
"""Called with the number of tokens just processed (forward tokens, including context)."""


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one text: ``exp(nll / tokens)``."""

    name: str
    tokens: int
    """Number of scored tokens."""
    nll: float
    """Sum of the negative log-likelihoods (nats) of the scored tokens."""
    seconds: float
    forward_tokens: int
    """Tokens run through the model, context included (cost of the evaluation)."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.forward_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class PerplexityReport:
    """Per-source perplexities; ``mean_ppl`` averages them, ``pooled_ppl`` pools all tokens."""

    results: dict[str, PerplexityResult]
    window: int
    stride: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_ppl(self) -> float:
        """Unweighted mean of the per-source perplexities (each source counts once)."""
        return sum(r.ppl for r in self.results.values()) / len(self.results)

    @property
    def pooled_ppl(self) -> float:
        """exp of the mean NLL over all scored tokens of all sources."""
        return math.exp(
            sum(r.nll for r in self.results.values()) / sum(r.tokens for r in self.results.values())
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "window": self.window,
            "stride": self.stride,
            "mean_ppl": self.mean_ppl,
            "pooled_ppl": self.pooled_ppl,
            "sources": {
                k: {
                    "ppl": r.ppl,
                    "tokens": r.tokens,
                    "seconds": r.seconds,
                    "tokens_per_second": r.tokens_per_second,
                }
                for k, r in self.results.items()
            },
        }

    def table(self) -> str:
        """A plain-text table: source, tokens, perplexity."""
        rows = [f"{'source':<14}{'tokens':>8}{'ppl':>10}"]
        rows += [f"{k:<14}{r.tokens:>8}{r.ppl:>10.2f}" for k, r in self.results.items()]
        rows.append(f"{'mean':<14}{sum(r.tokens for r in self.results.values()):>8}{self.mean_ppl:>10.2f}")
        return "\n".join(rows)


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window over ``n`` tokens; targets ``first_scored..end-1``.

    Example:
        >>> sliding_windows(10, 4, 2)
        [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
        >>> sliding_windows(10, 4, 4)   # disjoint chunks, each window starts one token early
        [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    """
    if window < 2 or not 1 <= stride <= window:
        raise DataError(
            f"sliding window needs window >= 2 and 1 <= stride <= window (got {window=}, {stride=})"
        )
    out = []
    prev_end = 1  # token 0 has no prediction
    begin = 0
    while prev_end < n:
        begin = min(begin, prev_end - 1)  # the first scored token needs one token of context
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return out


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    name: str = "text",
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 2,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``text`` (first ``max_tokens`` tokens if given).

    Example:
        >>> perplexity(model, tokenizer, "In the beginning God created the heaven.").ppl  # doctest: +SKIP
        12.3
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return perplexity_ids(
        model, torch.tensor(ids, dtype=torch.long), name=name, window=window, stride=stride,
        max_tokens=max_tokens, batch_size=batch_size, progress=progress,
    )  # fmt: skip


@torch.inference_mode()
def perplexity_ids(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    name: str = "text",
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 2,
    progress: ProgressCallback | None = None,
) -> PerplexityResult:
    """:func:`perplexity` of text already tokenized: ``ids`` a 1-D long tensor (a ``TextData`` split).

    Example:
        >>> perplexity_ids(model, data.validation["kjv"], window=256, stride=256).ppl   # doctest: +SKIP
        16.8
    """
    tokens = ids.reshape(-1).to(torch.long)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise DataError(
            f"{name}: needs at least 2 tokens for perplexity, got {tokens.numel()}; pass a longer text."
        )
    device = model_device(model)
    windows = sliding_windows(tokens.numel(), window, stride)
    was_training = model.training
    model.eval()
    nll = 0.0
    scored = 0
    forward = 0
    start = time.perf_counter()
    try:
        i = 0
        while i < len(windows):
            length = windows[i][1] - windows[i][0]
            group = [windows[i]]
            while len(group) < batch_size and i + len(group) < len(windows):
                nxt = windows[i + len(group)]
                if nxt[1] - nxt[0] != length:
                    break
                group.append(nxt)
            batch = torch.stack([tokens[b:e] for b, e, _ in group]).to(device)
            labels = batch.clone()
            for row, (b, e, first) in enumerate(group):
                labels[row, : first - b] = -100  # scored by an earlier window (the loss's ignore index)
                scored += e - first
            nll += float(nll_sum(model, batch, labels))
            forward += batch.numel()
            if progress is not None:
                progress(batch.numel())
            i += len(group)
    finally:
        model.train(was_training)
    return PerplexityResult(name, scored, nll, time.perf_counter() - start, forward)


def forward_tokens(n: int, window: int, stride: int) -> int:
    """How many tokens :func:`perplexity` runs through the model for ``n`` tokens (for progress totals)."""
    return sum(e - b for b, e, _ in sliding_windows(n, window, stride))


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Mapping[str, str],
    *,
    window: int = 512,
    stride: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 2,
    progress: ProgressCallback | None = None,
) -> PerplexityReport:
    """Perplexity of each named text (e.g. each corpus source), plus their averages.

    Example:
        >>> from shear.data import load_corpus                                    # doctest: +SKIP
        >>> r = evaluate_perplexity(model, tok, load_corpus("validation"), max_tokens=2048)  # doctest: +SKIP
        >>> round(r.mean_ppl)                                                      # doctest: +SKIP
        21
    """
    if not texts:
        raise DataError(
            "evaluate_perplexity got no texts; pass {source name: text}, e.g. load_corpus('validation')."
        )
    results = {
        name: perplexity(
            model,
            tokenizer,
            text,
            name=name,
            window=window,
            stride=stride,
            max_tokens=max_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        for name, text in texts.items()
    }
    return PerplexityReport(results, window, stride)


def nll_sum(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL (fp32) of ``model`` on ``batch`` ``[b, L]`` over the targets of ``labels``
    (aligned with the inputs; ``-100`` is not scored). Where the output head allows it, the head and
    the loss run a chunk of tokens at a time, so a batch's fp32 logits are never held whole."""
    from shear.kernels.losses import model_nll_sum  # on first use: ``import shear.data`` stays light

    return model_nll_sum(model, batch, labels, chunk=1024)


@torch.no_grad()
def window_perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of a causal LM over ``[w, L]`` windows (each window scored alone).

    Example:
        >>> window_perplexity(model, torch.randint(0, 100, (4, 32)))   # doctest: +SKIP
        98.7
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i : i + batch_size].to(device)
            nll += float(nll_sum(model, batch, batch))
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(nll / count) if count else float("nan")
