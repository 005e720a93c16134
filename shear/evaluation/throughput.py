"""Tokens per second of one causal LM, measured the way it is served: prefill, and decode two ways.

- **prefill bN**: one forward over ``N x prompt_tokens`` tokens that builds the KV cache
  (``use_cache=True``) and keeps the last position's logits only (``logits_to_keep=1`` where the
  model takes it), as a server does before the first new token.
- **decode bN** (``eager``): ``model.generate`` with transformers' dynamic cache, greedy; a
  stopping criterion that never stops notes the time after every new token, and the per-token time
  runs from the first new token (the prefill's) to the last, so the prompt's prefill is not in it.
- **decode bN static**: a transformers ``StaticCache`` and ``torch.compile`` of the model's forward
  (``reduce-overhead``, i.e. CUDA graphs, on CUDA), one compiled call per new token: what users
  deploy with transformers. Compiling costs tens of seconds, so it runs only when asked; a compile
  that fails is reported as ``not measured: <reason>``, never raised. Each such measurement starts
  from ``torch._dynamo.reset()`` (a benchmark of many models and batch sizes would otherwise pass
  dynamo's recompile limit and time eager code), so other compiled functions recompile after it.

Each measurement is a :class:`Probe`: a name and a function that returns tokens/s (or the reason
it could not be measured), so a comparison can interleave dense and pruned row by row.

Example:
    >>> probes = speed_probes(model, torch.device("cpu"), batches=(1,), prompt_tokens=16,
    ...                       new_tokens=4, repeats=1)                          # doctest: +SKIP
    >>> rates = {p.name: p.measure() for p in probes}                           # doctest: +SKIP
    >>> sorted(rates)                                                           # doctest: +SKIP
    ['decode b1', 'prefill b1']
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from shear.errors import InputError, ModelError
from shear.evaluation.timing import median_seconds, sync

__all__ = ["MODES", "Probe", "speed_probes", "forward_kwargs"]

MODES: tuple[str, ...] = ("eager", "static", "both")
"""Decode modes: ``eager`` (generate, dynamic cache), ``static`` (StaticCache + torch.compile), ``both``."""

DECODE_PROMPT = 8
"""Prompt length of the decode measurements (at most ``prompt_tokens``): decode cost barely depends on it."""

Outcome = float | str
"""Tokens per second, or ``"not measured: <reason>"``."""


@dataclass(frozen=True)
class Probe:
    """One measurement of one model: ``name`` (``"prefill b1"``, ``"decode b8 static"``) and
    ``measure()``, which returns tokens/s or ``"not measured: <reason>"``."""

    name: str
    measure: Callable[[], Outcome]


def forward_kwargs(model: nn.Module, cache_name: bool = False) -> dict[str, Any]:
    """The serving keywords ``model.forward`` takes: ``use_cache=True`` and ``logits_to_keep=1``
    where its signature has them; with ``cache_name=True`` also ``{"cache_key": name}``, the
    keyword the KV cache goes under (``cache`` in transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    out: dict[str, Any] = {}
    if "use_cache" in params:
        out["use_cache"] = True
    if "logits_to_keep" in params:
        out["logits_to_keep"] = 1
    if cache_name:
        out["cache_key"] = next((k for k in ("cache", "past_key_values") if k in params), None)
    return out


def _vocab(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ModelError(
            f"{type(model).__name__} has no config.vocab_size: speed is measured in tokens/s for causal "
            "language models; measure another model's latency with your own inputs"
        )
    return vocab


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _prefill(model: nn.Module, ids: torch.Tensor, repeats: int, device: torch.device) -> Outcome:
    kwargs = forward_kwargs(model)
    with torch.inference_mode():
        seconds = median_seconds(lambda: model(input_ids=ids, **kwargs), repeats, device)
    return ids.numel() / seconds


def _eager_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int, device: torch.device) -> Outcome:
    if not callable(getattr(model, "generate", None)):
        return f"not measured: {type(model).__name__} has no generate()"
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Called by ``generate`` after every new token: notes the time and never stops it."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            sync(device)
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    per_token = []
    with torch.inference_mode():
        for i in range(repeats + 1):  # the first is the warm-up
            clock = StepClock()
            model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,  # type: ignore[operator]
                           stopping_criteria=StoppingCriteriaList([clock]))  # fmt: skip
            if len(clock.times) != new_tokens:
                return f"not measured: generate() made {len(clock.times)} of {new_tokens} new tokens"
            if i:  # from the first new token (the prefill's) to the last: new_tokens - 1 decode steps
                per_token.append((clock.times[-1] - clock.times[0]) / (new_tokens - 1))
    return ids.shape[0] / statistics.median(per_token)


def _static_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, repeats: int, device: torch.device) -> Outcome:
    kwargs = forward_kwargs(model, cache_name=True)
    key = kwargs.pop("cache_key")
    config = getattr(model, "config", None)
    if key is None or config is None:
        return f"not measured: {type(model).__name__}.forward takes no KV cache"
    try:
        from transformers import StaticCache

        cache = StaticCache(config=config, max_cache_len=ids.shape[1] + new_tokens)
        torch._dynamo.reset()  # a fresh compile: past models and batch sizes would exhaust the recompile limit
        step = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default", dynamic=False)
    except Exception as e:  # noqa: BLE001 - any failure to set up is reported, not raised
        return f"not measured: {_reason(e)}"
    batch, start = ids.shape
    state: dict[str, torch.Tensor] = {}

    def prefill() -> None:
        cache.reset()
        state["token"] = _logits(model(input_ids=ids, **{key: cache}, **kwargs))[:, -1:].argmax(-1)

    def decode() -> None:
        token = state["token"]
        for i in range(new_tokens):
            position = torch.full((batch, 1), start + i, dtype=torch.long, device=device)
            out = step(input_ids=token, position_ids=position, **{key: cache}, **kwargs)
            token = _logits(out)[:, -1:].argmax(-1)

    try:
        with torch.inference_mode():
            seconds = median_seconds(decode, repeats, device, setup=prefill)
    except Exception as e:  # noqa: BLE001 - a compile failure is a finding, not a crash
        return f"not measured: torch.compile with a StaticCache failed: {_reason(e)}"
    return batch * new_tokens / seconds


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0][:200]}" if first else type(e).__name__


def speed_probes(
    model: nn.Module,
    device: torch.device,
    *,
    batches: Sequence[int] = (1, 8),
    prompt_tokens: int = 64,
    new_tokens: int = 16,
    repeats: int = 3,
    mode: str = "eager",
) -> list[Probe]:
    """The measurements of ``model`` (already on ``device``), in report order: prefill per batch,
    then decode per batch in ``mode`` (see :data:`MODES`). Token ids are random and seeded, the
    same for every model of one vocabulary size, so a dense and a pruned model see the same input."""
    if mode not in MODES:
        raise InputError(f"speed mode {mode!r} is not one of {', '.join(MODES)}; pick one of them")
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2), ("repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise InputError(f"speed {name}={value!r}: give an integer of at least {low}")
    if not batches or any(not isinstance(b, int) or b < 1 for b in batches):
        raise InputError(f"speed batches={tuple(batches)!r}: give positive batch sizes, e.g. (1, 8)")
    vocab = _vocab(model)
    gen = torch.Generator().manual_seed(0)
    probes: list[Probe] = []
    prompts = {b: torch.randint(0, vocab, (b, prompt_tokens), generator=gen).to(device) for b in batches}
    short = min(DECODE_PROMPT, prompt_tokens)
    for b in batches:
        probes.append(Probe(f"prefill b{b}", partial(_prefill, model, prompts[b], repeats, device)))
    for b in batches:
        ids = prompts[b][:, :short]
        if mode in ("eager", "both"):
            probes.append(Probe(f"decode b{b}", partial(_eager_decode, model, ids, new_tokens, repeats, device)))
        if mode in ("static", "both"):
            probes.append(Probe(f"decode b{b} static", partial(_static_decode, model, ids, new_tokens, repeats, device)))
    return probes
