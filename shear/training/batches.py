"""Deterministic, resumable batch streams for causal-LM training.

A stream yields micro-batches ``{"input_ids", "labels"[, "attention_mask"]}`` forever and can say
exactly where it is: ``state_dict()`` / ``load_state_dict()`` capture the data position, so a resumed
run sees the same rows as an uninterrupted one. Labels follow the transformers convention: aligned
with ``input_ids`` (the loss shifts them), ``-100`` where no loss is taken.

Under data parallelism, ``shard(rank, world_size)`` gives each process its own rows: every process
draws the same *global* batch of ``batch_size * world_size`` rows and keeps the slice
``[rank * batch_size, (rank + 1) * batch_size)``, so the ranks together see exactly what one process
with ``batch_size * world_size`` rows would see.

Example:
    >>> import torch
    >>> stream = TokenBatches({"web": torch.arange(100), "code": torch.arange(50)}, batch_size=2, seq_len=8)
    >>> batch = next(stream)
    >>> batch["input_ids"].shape
    torch.Size([2, 8])
    >>> saved = stream.state_dict()
    >>> a = next(stream)["input_ids"]
    >>> stream.load_state_dict(saved)
    >>> torch.equal(next(stream)["input_ids"], a)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from shear.errors import DataError
from shear.kernels.losses import IGNORE_INDEX

__all__ = ["BatchStream", "TokenBatches", "InstructionBatches", "IGNORE_INDEX"]



@runtime_checkable
class BatchStream(Protocol):
    """What :func:`~shear.training.loop.train` consumes: an endless, resumable batch iterator.

    A stream may also have ``fingerprint() -> str``, a digest of its data, so that a checkpoint
    resumes only a run over the same data (both streams here have one).
    """

    batch_size: int
    rank: int
    world_size: int

    def __next__(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def shard(self, rank: int, world_size: int) -> BatchStream: ...


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad shard rank={rank} of world_size={world_size}; need 0 <= rank < world_size")


class TokenBatches:
    """Random windows of ``seq_len`` tokens from named token streams, mixed by weight.

    ``tokens`` maps a source name to a 1-D tensor of token ids. Each row picks its source with
    probability proportional to ``weights`` (default: the token counts), then a uniformly random
    window of that source; ``labels`` equal ``input_ids``. One private ``torch.Generator`` drives
    both draws, so the stream does not touch (and is not touched by) the global RNG.

    Example:
        >>> import torch
        >>> s = TokenBatches({"a": torch.zeros(20, dtype=torch.long), "b": torch.ones(20, dtype=torch.long)},
        ...                  batch_size=64, seq_len=4, weights={"a": 0.0, "b": 1.0})
        >>> bool((next(s)["input_ids"] == 1).all())
        True
    """

    def __init__(
        self,
        tokens: Mapping[str, torch.Tensor],
        batch_size: int,
        seq_len: int,
        *,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 2:
            raise DataError(f"TokenBatches needs batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
        if not tokens:
            raise DataError("TokenBatches got no sources; pass {name: 1-D tensor of token ids}")
        _check_shard(rank, world_size)
        self.names: list[str] = list(tokens)
        self.tokens: list[torch.Tensor] = []
        for name in self.names:
            t = tokens[name]
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point:
                raise DataError(f"source {name!r} must be a 1-D integer tensor of token ids, got {_describe(t)}")
            if t.numel() < seq_len:
                raise DataError(
                    f"source {name!r} has {t.numel()} tokens, fewer than seq_len={seq_len}; "
                    "add text to it, drop it, or lower seq_len"
                )
            self.tokens.append(t.long().contiguous())
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._gen = torch.Generator().manual_seed(seed)
        self._batches = 0
        self._probs = torch.zeros(0)
        self.set_weights(weights)

    @classmethod
    def from_config(
        cls, tokens: Mapping[str, torch.Tensor], config: Any, *, weights: Mapping[str, float] | None = None
    ) -> TokenBatches:
        """A stream with ``config.batch_size``, ``config.seq_len`` and ``config.seed`` (a TrainConfig)."""
        return cls(tokens, config.batch_size, config.seq_len, weights=weights, seed=config.seed)

    @property
    def weights(self) -> dict[str, float]:
        """The current mixture, normalised to sum to 1."""
        return {n: float(p) for n, p in zip(self.names, self._probs.tolist())}

    def set_weights(self, weights: Mapping[str, float] | None) -> None:
        """Change the source mixture from the next batch on (``None``: proportional to token counts)."""
        if weights is None:
            raw = [float(t.numel()) for t in self.tokens]
        else:
            unknown = sorted(set(weights) - set(self.names))
            if unknown:
                raise DataError(f"weights name unknown sources {unknown}; the sources are {self.names}")
            raw = [float(weights.get(n, 0.0)) for n in self.names]
            bad = [n for n, w in zip(self.names, raw) if not w >= 0 or w == float("inf")]
            if bad:
                raise DataError(f"weights of {bad} are negative or not finite; use finite weights >= 0")
        if sum(raw) <= 0:
            raise DataError(f"all source weights are 0 ({dict(zip(self.names, raw))}); give one source a weight > 0")
        probs = torch.tensor(raw, dtype=torch.float64)
        self._probs = probs / probs.sum()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = self.batch_size * self.world_size
        src = torch.multinomial(self._probs, rows, replacement=True, generator=self._gen)
        u = torch.rand(rows, generator=self._gen, dtype=torch.float64)
        lo = self.rank * self.batch_size
        out = []
        for i in range(lo, lo + self.batch_size):
            t = self.tokens[int(src[i])]
            start = int(u[i] * (t.numel() - self.seq_len + 1))
            out.append(t[start : start + self.seq_len])
        self._batches += 1
        ids = torch.stack(out)
        return {"input_ids": ids, "labels": ids.clone()}

    def fingerprint(self) -> str:
        """Digest of the sources (names, lengths, a sample of the ids): a checkpoint resumes only a
        run over the same data."""
        from shear.training.fingerprint import tensor_digest

        return tensor_digest(zip(self.names, self.tokens))

    def state_dict(self) -> dict[str, Any]:
        """The exact data position: generator state, mixture and batches drawn."""
        return {"generator": self._gen.get_state(), "weights": self._probs.tolist(), "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to a position saved by :meth:`state_dict` (of a stream over the same sources)."""
        if len(state["weights"]) != len(self.names):
            raise DataError(
                f"saved batch state has {len(state['weights'])} sources, this stream {len(self.names)}; "
                "resume with the same sources"
            )
        self._gen.set_state(state["generator"])
        self._probs = torch.tensor(state["weights"], dtype=torch.float64)
        self._batches = int(state["batches"])

    def shard(self, rank: int, world_size: int) -> TokenBatches:
        """A copy at the same position that yields only process ``rank``'s rows of each global batch."""
        _check_shard(rank, world_size)
        other = copy.copy(self)
        other._gen = torch.Generator().manual_seed(self.seed)
        other._gen.set_state(self._gen.get_state())
        other.rank, other.world_size = rank, world_size
        return other


class InstructionBatches:
    """Batches of (prompt + response) examples, shuffled per epoch, padded right.

    Each example is ``(input_ids, labels)`` as :func:`shear.data.instructions.tokenize_instruction`
    makes them: labels are ``-100`` on the prompt, so the loss is on the response only. Padding uses
    ``pad_id`` with labels ``-100`` and ``attention_mask`` 0. Epoch ``e`` visits the examples in the
    order ``randperm(n)`` of a generator seeded with ``seed + e``.

    Example:
        >>> import torch
        >>> ex = [(torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7])), (torch.tensor([8, 9]), torch.tensor([-100, 9]))]
        >>> b = next(InstructionBatches(ex, batch_size=2, pad_id=0))
        >>> b["attention_mask"].sum().item()
        5
    """

    def __init__(
        self,
        examples: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        *,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"InstructionBatches needs batch_size >= 1, got {batch_size}")
        if not examples:
            raise DataError("InstructionBatches got no examples; pass a list of (input_ids, labels)")
        _check_shard(rank, world_size)
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (ids, labels) in enumerate(examples):
            ids, labels = torch.as_tensor(ids).long().flatten(), torch.as_tensor(labels).long().flatten()
            if ids.shape != labels.shape or ids.numel() < 2:
                raise DataError(
                    f"example {i}: input_ids {tuple(ids.shape)} and labels {tuple(labels.shape)} must have the "
                    "same length >= 2"
                )
            if not bool((labels[1:] != IGNORE_INDEX).any()):
                raise DataError(
                    f"example {i} has no response tokens to learn (all labels after the first are -100); "
                    "raise max_length when tokenizing or drop the example"
                )
            self.examples.append((ids, labels))
        self.batch_size = batch_size
        self.pad_id = int(pad_id)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        self._pos = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def _take(self) -> int:
        if self._pos == len(self._order):
            self._epoch += 1
            self._pos = 0
            self._order = self._permutation(self._epoch)
        idx = self._order[self._pos]
        self._pos += 1
        return idx

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        chosen = [self.examples[self._take()] for _ in range(self.batch_size * self.world_size)]
        width = max(ids.numel() for ids, _ in chosen)  # the global width: every rank pads alike
        mine = chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        ids_out = torch.full((len(mine), width), self.pad_id, dtype=torch.long)
        labels_out = torch.full((len(mine), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(mine), width), dtype=torch.long)
        for row, (ids, labels) in enumerate(mine):
            n = ids.numel()
            ids_out[row, :n], labels_out[row, :n], mask[row, :n] = ids, labels, 1
        return {"input_ids": ids_out, "labels": labels_out, "attention_mask": mask}

    @property
    def epoch(self) -> int:
        """Epochs completed so far."""
        return self._epoch

    def fingerprint(self) -> str:
        """Digest of the examples (a sample of their tokens and labels): a checkpoint resumes only a run
        over the same data."""
        from shear.training.fingerprint import tensor_digest

        ids = torch.cat([i for i, _ in self.examples])
        labels = torch.cat([lab for _, lab in self.examples])
        lengths = torch.tensor([i.numel() for i, _ in self.examples])
        return tensor_digest([("ids", ids), ("labels", labels), ("lengths", lengths)])

    def state_dict(self) -> dict[str, Any]:
        """The exact data position: epoch and index within the epoch's order."""
        return {"epoch": self._epoch, "pos": self._pos, "examples": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go back to a position saved by :meth:`state_dict` (of a stream over the same examples)."""
        if int(state["examples"]) != len(self.examples):
            raise DataError(
                f"saved batch state is over {state['examples']} examples, this stream has {len(self.examples)}; "
                "resume with the same examples"
            )
        self._epoch, self._pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self._epoch)

    def shard(self, rank: int, world_size: int) -> InstructionBatches:
        """A copy at the same position that yields only process ``rank``'s rows of each global batch."""
        _check_shard(rank, world_size)
        other = copy.copy(self)
        other._order = list(self._order)
        other.rank, other.world_size = rank, world_size
        return other


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dim()}-D {t.dtype} tensor"
    return type(t).__name__
