"""The rounds of ``recover-dynamic``: the training streams, the per-stage loop with its stopping rule,
and the helpers that read the pass's data and adapters (the pass itself is in :mod:`shear.passes.lorashear.recovery`).

Example:
    >>> from shear.passes.lorashear.recovery import RecoverDynamic
    >>> run = RecoveryRun(RecoverDynamic(), ctx, data, sources_of(ctx, data), dense={})   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from shear.codegen.hf_config import max_positions
from shear.data.text import TextData
from shear.errors import DataError
from shear.kernels.recovery import (
    Patience,
    degradation,
    instruction_loss,
    mean_log,
    perplexity_gain,
    source_weights,
)
from shear.passes.base import Context
from shear.passes.lorashear.recovery_results import (
    BUDGET_SPENT,
    NO_VALIDATION,
    DensePerplexity,
    RecoveryResult,
    RecoveryRound,
    Stage,
    patience_stop,
)

__all__ = ["RecoveryOptions", "RecoveryRun", "sources_of", "optional_dense", "with_response"]


class RecoveryOptions(Protocol):
    """What a recovery run reads of its pass (:class:`~shear.passes.lorashear.recovery.RecoverDynamic`,
    where each option is documented)."""

    name: str
    stage_list: tuple[Stage, ...]
    instructions: bool
    max_rounds: int
    steps_per_round: int
    min_gain: float
    patience: int
    keep_best: bool
    floor: float
    temperature: float
    mixture: Literal["softmax", "proportional"]
    lr: float
    batch_size: int
    grad_accum: int
    seq_len: int
    eval_windows: int | None
    eval_batch_size: int
    seed: int
    gradient_checkpointing: bool | Literal["auto"]
    checkpoint_dir: str
    checkpoint_every: int
    distill: float
    distill_temperature: float
    teacher: str


class RecoveryRun:
    """The state of one recovery run: the streams, the current metrics, and the records so far."""

    def __init__(
        self, p: RecoveryOptions, ctx: Context, data: TextData, sources: list[str], dense: dict[str, float]
    ) -> None:
        from shear.training import InstructionBatches, TokenBatches

        self.p, self.ctx, self.data, self.sources, self.dense = p, ctx, data, sources, dense
        self.rounds: list[RecoveryRound] = []
        self.stopped: dict[str, str] = {}
        self.bar: Any = None
        self.dense_instr: float | None = None
        self.ppl: dict[str, float] = {}
        self.instr: float | None = None
        self.unmeasured = not sources and "pretrain" in p.stage_list
        """No training source has validation text: the pretraining stage trains every round, uniformly."""
        train = list(data.train) if self.unmeasured else sources
        self.tokens_stream = (
            TokenBatches({s: data.train[s] for s in train}, p.batch_size, p.seq_len, seed=p.seed) if train else None
        )
        self.pad_id = _pad_id(data.tokenizer)
        from shear.passes.lorashear.lhspg import distill_loss

        self.loss_fn = distill_loss(ctx, p.name, p.teacher, p.distill, p.distill_temperature)
        limit = max_positions(ctx.model)
        self.instr_train = with_response(ctx, data.instructions, "instructions", limit)
        self.instr_val = with_response(ctx, data.instructions_val, "instructions_val", limit)
        self.instr_stream = (
            InstructionBatches(self.instr_train, p.batch_size, pad_id=self.pad_id, seed=p.seed)
            if self.instr_train and "instruct" in p.stage_list and p.instructions
            else None
        )
        self.with_instr = self.instr_stream is not None and bool(self.instr_val)

    def evaluate(self) -> tuple[dict[str, float], float | None]:
        p, model = self.p, self.ctx.model
        ppl = (
            self.data.perplexity(
                model, seq_len=p.seq_len, max_windows=p.eval_windows, sources=self.sources, batch_size=p.eval_batch_size
            )
            if self.sources
            else {}
        )
        instr = None
        if self.with_instr:
            instr = instruction_loss(model, self.instr_val, pad_id=self.pad_id, batch_size=p.eval_batch_size)
        return ppl, instr

    def require_instructions(self) -> None:
        """Fail before any training when the instruction stage would have no examples left."""
        if self.with_instr:
            return
        limit = max_positions(self.ctx.model)
        raise DataError(
            "recover-dynamic: every instruction example (train or validation) lost its response to the "
            "tokenizing max length" + (f" or to the model's {limit} positions" if limit else "")
            + "; raise instruction_max_length, or use stages=pretrain"
        )

    def initial(self) -> None:
        self.ppl, self.instr = self.evaluate()
        self.rounds.append(RecoveryRound("initial", 0, {}, dict(self.ppl), self.instr))
        dense_model = self.ctx.dense
        if self.with_instr and isinstance(dense_model, nn.Module) and dense_model is not self.ctx.model:
            self.dense_instr = instruction_loss(
                dense_model, self.instr_val, pad_id=self.pad_id, batch_size=self.p.eval_batch_size
            )

    def metric(self, stage: Stage, ppl: dict[str, float], instr: float | None) -> float:
        if stage == "pretrain":
            return mean_log(ppl)
        assert instr is not None
        return instr

    def stage(self, stage: Stage) -> None:
        """Rounds of ``stage`` until its budget is spent or ``patience`` rounds in a row lowered the stage's
        validation perplexity by less than ``min_gain`` (:class:`~shear.kernels.recovery.Patience`)."""
        p = self.p
        if stage == "pretrain" and self.unmeasured:
            self._unmeasured()
            return
        self.stopped[stage] = BUDGET_SPENT
        rule = Patience(self.metric(stage, self.ppl, self.instr), min_gain=p.min_gain, patience=p.patience)
        for k in range(1, p.max_rounds + 1):
            before = self.metric(stage, self.ppl, self.instr)
            weights: dict[str, float] = {}
            deg: dict[str, float] = {}
            if stage == "pretrain":
                assert self.tokens_stream is not None
                deg = degradation(self.ppl, self.dense)
                weights = source_weights(deg, floor=p.floor, temperature=p.temperature, mode=p.mixture)
                self.tokens_stream.set_weights(weights)
                stream: Any = self.tokens_stream
            else:
                stream = self.instr_stream
            saved = _adapters(self.ctx.model) if p.keep_best else None
            trained = self._train(stream, stage, k)
            ppl, instr = self.evaluate()
            gain = perplexity_gain(before, self.metric(stage, ppl, instr))
            restored = saved is not None and gain < 0
            if restored:
                _restore(self.ctx.model, saved or {})
            else:
                self.ppl, self.instr = ppl, instr
            loss = sum(trained.losses[-p.steps_per_round :]) / max(len(trained.losses[-p.steps_per_round :]), 1)
            self.rounds.append(
                RecoveryRound(
                    stage, k, weights, dict(ppl), instr, deg, trained.steps, trained.tokens, loss, gain, restored
                )
            )
            if self.bar is not None:
                self.bar.set_description(f"recover-dynamic {stage} round {k}: gain {gain:+.2%}")
            if rule.update(self.metric(stage, self.ppl, self.instr)) and k < p.max_rounds:
                self.stopped[stage] = patience_stop(p.patience, p.min_gain)
                if self.bar is not None:
                    self.bar.advance((p.max_rounds - k) * p.steps_per_round)
                return

    def _unmeasured(self) -> None:
        """The pretraining stage without validation text: every round, a uniform mixture, nothing measured."""
        p = self.p
        assert self.tokens_stream is not None
        names = list(self.data.train)
        weights = {s: 1.0 / len(names) for s in names}
        self.tokens_stream.set_weights(weights)
        for k in range(1, p.max_rounds + 1):
            trained = self._train(self.tokens_stream, "pretrain", k)
            loss = sum(trained.losses[-p.steps_per_round :]) / max(len(trained.losses[-p.steps_per_round :]), 1)
            self.rounds.append(RecoveryRound("pretrain", k, weights, {}, None, {}, trained.steps, trained.tokens, loss))
        self.stopped["pretrain"] = NO_VALIDATION

    def _train(self, stream: Any, stage: Stage, k: int) -> Any:
        from shear.training import TrainConfig, train
        from shear.training.fingerprint import options_of

        p = self.p
        ckpt = str(Path(p.checkpoint_dir) / f"{stage}-{k:02d}") if p.checkpoint_dir else None
        config = TrainConfig(
            steps=p.steps_per_round,
            lr=p.lr,
            batch_size=p.batch_size,
            grad_accum=p.grad_accum,
            seq_len=p.seq_len,
            seed=p.seed + len(self.rounds),
            gradient_checkpointing=p.gradient_checkpointing,
            checkpoint_dir=ckpt,
            checkpoint_every=p.checkpoint_every if ckpt else 0,
        )
        options = {**options_of(p), "stage": stage, "round": k}
        trained = train(self.ctx.model, stream, config, progress=self.bar, run_options=options, loss_fn=self.loss_fn)
        for w in getattr(trained, "warnings", []):
            if f"recover-dynamic: {w}" not in self.ctx.warnings:
                self.ctx.warn(f"recover-dynamic: {w}")
        return trained

    def result(self, wall: float) -> RecoveryResult:
        return RecoveryResult(
            rounds=tuple(self.rounds),
            dense_ppl=dict(self.dense),
            dense_instruction_loss=self.dense_instr,
            stopped=dict(self.stopped),
            wall_s=wall,
        )


# -- helpers ----------------------------------------------------------------------------------------


def sources_of(ctx: Context, data: TextData) -> list[str]:
    """Training sources that have validation text (the others cannot be weighed; they are left out);
    none: a warning, and the pretraining stage trains its whole budget on a uniform mixture."""
    sources = [s for s in data.train if s in data.validation]
    if not sources:
        ctx.warn(
            f"recover-dynamic weighs sources by their validation perplexity, but no training source "
            f"({sorted(data.train)}) has validation text ({sorted(data.validation)}): it trains every round on a "
            "uniform mixture and cannot stop early; give TextData.from_texts(tokenizer, train, validation) the "
            "same source names"
        )
        return []
    left = [s for s in data.train if s not in data.validation]
    if left:
        ctx.warn(f"recover-dynamic: sources {left} have no validation text and are left out of recovery")
    return sources


def optional_dense(ctx: Context, sources: list[str]) -> dict[str, float]:
    cached = ctx.find(DensePerplexity)
    if isinstance(cached, Mapping) and all(s in cached for s in sources):
        return {s: float(cached[s]) for s in sources}
    return {}


def with_response(
    ctx: Context, examples: list[tuple[torch.Tensor, torch.Tensor]], split: str, limit: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The examples that keep response tokens (tokenizing at a max length can cut a response off),
    each cut to the model's ``limit`` positions (learned position embeddings end there)."""
    if limit is not None and any(len(ids) > limit for ids, _ in examples):
        ctx.warn(f"recover-dynamic: TextData.{split} examples are cut to the model's {limit} positions")
        examples = [(ids[:limit], labels[:limit]) for ids, labels in examples]
    kept = [(ids, labels) for ids, labels in examples if bool((labels[1:] != -100).any())]
    if len(kept) < len(examples):
        ctx.warn(
            f"recover-dynamic: left out {len(examples) - len(kept)} of {len(examples)} TextData.{split} examples "
            "whose response was cut off by the tokenizing max length (raise instruction_max_length)"
        )
    return kept


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable (LoRA) parameters: what a round changes."""
    from shear.training import is_lora_param

    return {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_param(n)}


@torch.no_grad()
def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        if n in saved:
            p.copy_(saved[n])


