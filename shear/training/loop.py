"""The one LoRA training loop shared by LHSPG, recovery fine-tuning and EBFT.

:func:`train` runs ``config.steps`` AdamW steps over the trainable parameters (for a peft model:
the LoRA adapters only) on micro-batches from a :class:`~shear.training.batches.BatchStream`:

1. check what trains (non-LoRA params are frozen when LoRA exists; nothing trainable is an error);
2. seed everything, or resume from the newest checkpoint in ``config.checkpoint_dir`` — only when it
   was written by the same run: same config, same starting weights, same data, same ``run_options``
   and shear version (:mod:`~shear.training.fingerprint`); else a :class:`CheckpointError`
   names what differs. A resumed run says so in ``TrainResult.warnings`` ("resumed from step N");
3. per step: ``grad_accum`` micro-batches, loss summed over target tokens and divided by the step's
   total (over all ranks), backward (gradient sync on the last micro-batch only), clip,
   ``optimizer.step()``, ``zero_grad()``, ``scheduler.step()``, then ``after_optimizer_step`` hooks;
4. every ``checkpoint_every`` steps (and at the last) rank 0 writes ``step-<n>/`` atomically.

A killed run re-run with the same config continues from its last checkpoint to bit-identical
weights (CPU fp32; on GPU up to the determinism of its kernels). Under ``torchrun`` or
``accelerate launch`` the same call trains data-parallel: pass the ``Accelerator`` or initialise
``torch.distributed``; the batch stream is sharded by rank.

With ``parallel="fsdp"`` (or ``SHEAR_PARALLEL=fsdp``, or an accelerate FSDP config) the loop trains an
FSDP2-sharded copy of the model (:mod:`~shear.training.fsdp`): hooks see the sharded copy as
``state.model`` (``state.unsharded()`` gives the whole weights for reading), checkpoints are sharded
(:mod:`~shear.training.dcp_checkpoints`), and at the end the trained weights are
gathered into the caller's ``model``, which stays a plain module.

Example:
    >>> from shear.training import TrainConfig, TokenBatches, ensure_lora, train   # doctest: +SKIP
    >>> model, msg = ensure_lora(model)                                                    # doctest: +SKIP
    >>> cfg = TrainConfig(steps=200, batch_size=4, seq_len=256, checkpoint_dir="ckpt", checkpoint_every=50)
    >>> batches = TokenBatches.from_config({"web": web_ids, "code": code_ids}, cfg)         # doctest: +SKIP
    >>> result = train(model, batches, cfg)                                                # doctest: +SKIP
    >>> result.losses[-1] < result.losses[0]                                               # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shear.errors import CheckpointError, TrainingError
from shear.kernels.losses import (
    LOSS_CHUNK_TOKENS,
    causal_lm_loss_sum,
    chunk_tokens,
    chunked_causal_lm_loss_sum,
    count_targets,
    forward_kwargs,
    head_bypassed,
    logits_of,
    output_head,
)
from shear.model.devices import model_device
from shear.training.adapters import is_lora_param
from shear.training.batches import BatchStream
from shear.training.checkpoints import (
    TrainCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from shear.training.config import TrainConfig
from shear.training.dcp_checkpoints import (
    SHARDED_FORMAT,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    read_record,
    save_sharded_checkpoint,
)
from shear.training.distributed import Parallel, detect_parallel
from shear.training.fingerprint import RunFingerprint
from shear.training.fsdp import fsdp_mesh, shard_copy, write_back
from shear.training.hooks import TrainHook, TrainState
from shear.training.optim import build_optimizer, build_scheduler
from shear.training.peak_memory import PeakMemory, auto_checkpointing, auto_loss_chunking
from shear.training.result import StepLog, TrainResult
from shear.training.rng import capture_rng, restore_rng, seed_everything

__all__ = ["train", "select_trainable", "resolve_bf16", "LossFn", "Progress"]

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
"""A custom loss: ``(model, micro-batch) -> mean loss``; steps average it over micro-batches."""

Progress = Any
"""A bar with ``advance()`` (and optionally ``set_description(str)``, e.g. ``ctx.progress(...)``'s),
a callable taking a :class:`~shear.training.result.StepLog`, or ``True`` for a rich bar."""


def select_trainable(model: nn.Module, warnings: list[str]) -> list[nn.Parameter]:
    """The parameters :func:`train` optimises; freezes non-LoRA ones when LoRA adapters exist.

    Raises :class:`TrainingError` when nothing would train.
    """
    named = list(model.named_parameters())
    lora = [(n, p) for n, p in named if is_lora_param(n)]
    if lora:
        extra = [n for n, p in named if p.requires_grad and not is_lora_param(n)]
        for n, p in named:
            if n in extra:
                p.requires_grad_(False)
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            warnings.append(
                f"froze {len(extra)} non-LoRA parameters that required grad ({', '.join(extra[:3])}{more}); "
                "only the LoRA adapters train"
            )
        if not any(p.requires_grad for _, p in lora):
            raise TrainingError(
                f"the LoRA adapters of {type(model).__name__} are all frozen; make them trainable "
                "(PeftModel.from_pretrained(..., is_trainable=True), or requires_grad_(True) on the lora_ params)"
            )
    params = [p for _, p in named if p.requires_grad]
    if not params:
        raise TrainingError(
            f"no parameter of {type(model).__name__} requires grad, so there is nothing to train; add LoRA "
            "adapters first: model, msg = shear.training.ensure_lora(model)"
        )
    return params


def resolve_bf16(config: TrainConfig, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``config.bf16``, or (``None``) on CUDA devices that support it."""
    if config.bf16 is None:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"TrainConfig.bf16=True but {torch.cuda.get_device_name(device)} has no bf16; use bf16=None")
    return config.bf16


def _check_stream(batches: BatchStream, config: TrainConfig, par: Parallel) -> BatchStream:
    size = getattr(batches, "batch_size", config.batch_size)
    if size != config.batch_size:
        raise TrainingError(
            f"the batch stream yields {size} rows per micro-batch but config.batch_size={config.batch_size}; "
            "build it with TokenBatches.from_config(tokens, config) or make the two equal"
        )
    seq = getattr(batches, "seq_len", config.seq_len)
    if seq != config.seq_len:
        raise TrainingError(
            f"the batch stream yields rows of {seq} tokens but config.seq_len={config.seq_len}; make the two equal"
        )
    world = getattr(batches, "world_size", 1)
    if world == par.world_size:
        return batches
    if world == 1:
        return batches.shard(par.rank, par.world_size)
    raise TrainingError(
        f"the batch stream is sharded for {world} processes but {par.world_size} take part; "
        "pass an unsharded stream and let train() shard it"
    )


def _device_of(model: nn.Module, par: Parallel) -> torch.device:
    return par.device if par.device is not None else model_device(model)


def _enable_checkpointing(model: nn.Module, warnings: list[str]) -> Callable[[], None]:
    """Turn on non-reentrant gradient checkpointing; returns the undo."""
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if not callable(enable):
        warnings.append(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); trained without gradient checkpointing"
        )
        return lambda: None
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    was_on = bool(getattr(model, flag, False))
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable = getattr(model, "gradient_checkpointing_disable", None)
    if was_on or not callable(disable):
        return lambda: None
    return disable


@contextmanager
def _progress(progress: Progress, total: int, is_main: bool) -> Iterator[Any]:
    if progress is None or progress is False or not is_main:
        yield None
        return
    if progress is True:
        from shear.progress import RichSink, open_bar

        with open_bar(RichSink(), total, "train") as bar:
            yield bar
        return
    yield progress


def _report(progress: Any, log: StepLog | None, steps: int) -> None:
    if progress is None:
        return
    if hasattr(progress, "advance"):
        progress.advance(steps)
        if log is not None and hasattr(progress, "set_description"):
            progress.set_description(f"train {log.describe()}")
    elif log is not None:
        progress(log)


def _check_resumable(path: Path, info: dict[str, Any], config: TrainConfig, run: RunFingerprint) -> None:
    mismatch = config.resume_mismatch(info.get("config", {}))
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} was written with another config ({'; '.join(mismatch)}); resume with the "
            "same config, or start over with resume=False or a new checkpoint_dir"
        )
    other = run.differences(info.get("fingerprint"))
    if other:
        done = " finished" if info.get("finished") else ""
        raise CheckpointError(
            f"checkpoint {path} belongs to another{done} run ({'; '.join(other)}); it is not resumed. Use a new "
            f"checkpoint_dir, delete {path.parent}, or start over with resume=False"
        )


def _load(path: Path, state: TrainState, config: TrainConfig, run: RunFingerprint, par: Parallel) -> TrainCheckpoint:
    """Read the checkpoint at ``path`` for this run: plain, or (FSDP) sharded straight into the model and optimizer."""
    if not par.sharded:
        if is_sharded_checkpoint(path):
            world = (read_record(path) or {}).get("world_size")
            raise CheckpointError(
                f"checkpoint {path} was written by an FSDP run on {world} processes; resume it the same way "
                f"(torchrun --nproc_per_node {world} with parallel='fsdp' or SHEAR_PARALLEL=fsdp), or start over "
                "with resume=False or a new checkpoint_dir"
            )
        ckpt = load_checkpoint(path)
        _check_resumable(ckpt.path, ckpt.info, config, run)
        return ckpt
    record = read_record(path)
    if record is not None and record.get("format") == SHARDED_FORMAT:
        _check_resumable(path, record, config, run)
    return load_sharded_checkpoint(path, model=state.model, optimizer=state.optimizer)


def _restore(ckpt: TrainCheckpoint, state: TrainState, hooks: Sequence[TrainHook]) -> None:
    saved_hooks = ckpt.state["hooks"]
    if len(saved_hooks) != len(hooks):
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds the state of {len(saved_hooks)} hooks, this run has {len(hooks)}; "
            "resume with the same hooks, or start over with resume=False"
        )
    if "optimizer" in ckpt.state:  # a sharded checkpoint loaded weights and optimizer already
        try:
            state.model.load_state_dict(ckpt.model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {ckpt.path} does not fit {type(state.model).__name__} ({e}); resume the same model "
                "(same LoRA adapters), or start over with resume=False"
            ) from e
        state.optimizer.load_state_dict(ckpt.state["optimizer"])
    state.scheduler.load_state_dict(ckpt.state["scheduler"])
    state.batches.load_state_dict(ckpt.state["batches"])
    for hook, saved in zip(hooks, saved_hooks):
        hook.load_state_dict(saved)
    state.step = ckpt.step
    state.losses = [float(x) for x in ckpt.info["losses"]]
    state.tokens = int(ckpt.info["tokens"])


def _save(state: TrainState, hooks: Sequence[TrainHook], config: TrainConfig, run: RunFingerprint, par: Parallel) -> None:
    """Rank 0 writes a plain checkpoint; under FSDP every rank writes its shards and its own states."""
    rng_tensors, rng_plain = capture_rng()
    assert config.checkpoint_dir is not None
    info = {
        "losses": state.losses, "tokens": state.tokens, "config": config.to_dict(),
        "world_size": state.world_size, "fingerprint": run.to_dict(), "finished": state.step == config.steps,
    }
    if par.sharded:
        mine = {
            "scheduler": state.scheduler.state_dict(), "batches": state.batches.state_dict(),
            "hooks": [h.state_dict() for h in hooks], "rng": rng_tensors,
        }
        save_sharded_checkpoint(config.checkpoint_dir, state.step, model=state.model, optimizer=state.optimizer,
                                rank_state=mine, rank_info=rng_plain, info=info)
        return
    if not par.is_main:
        return
    extra = {
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "batches": state.batches.state_dict(),
        "hooks": [h.state_dict() for h in hooks],
        "rng": rng_tensors,
    }
    save_checkpoint(config.checkpoint_dir, state.step, model=state.model, extra=extra, info={**info, "rng": rng_plain})


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _lm_loss_sum(run_model: nn.Module, model: nn.Module, batch: Mapping[str, torch.Tensor], chunk: int | None) -> torch.Tensor:
    """The token-summed causal-LM loss of one micro-batch; with ``chunk``, without the full logits."""
    if chunk is None:
        return causal_lm_loss_sum(logits_of(run_model(**forward_kwargs(model, batch))), batch["labels"])
    with head_bypassed(model) as head:
        hidden = logits_of(run_model(**forward_kwargs(model, batch)))
    return chunked_causal_lm_loss_sum(hidden, head, batch["labels"], chunk=chunk)


def _input_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _resume_or_seed(
    model: nn.Module, state: TrainState, hooks: Sequence[TrainHook], config: TrainConfig, par: Parallel,
    run_options: Mapping[str, Any] | None, warnings: list[str],
) -> tuple[TrainCheckpoint | None, RunFingerprint]:
    """Load the newest checkpoint of this run into ``state`` and ``hooks`` (when there is one and
    ``config.resume``), else seed everything; returns it and the run's fingerprint."""
    ckpt: TrainCheckpoint | None = None
    run = RunFingerprint(model="", data="")
    if config.checkpoint_dir is not None:
        stream_digest = getattr(state.batches, "fingerprint", None)
        run = RunFingerprint.of(model, data=stream_digest() if callable(stream_digest) else "", options=run_options)
        if par.is_main:
            remove_stale_temporaries(config.checkpoint_dir)
        par.barrier()
        latest = latest_checkpoint(config.checkpoint_dir) if config.resume else None
        if latest is not None:
            ckpt = _load(latest, state, config, run, par)
            _restore(ckpt, state, hooks)
            warnings.append(
                f"the run in {config.checkpoint_dir} had already finished at step {ckpt.step}; its result is reused"
                if ckpt.info.get("finished") else f"resumed from step {ckpt.step} of {config.steps} ({ckpt.path})"
            )
    if ckpt is None:
        seed_everything(config.seed)
    return ckpt, run


def _memory_savers(work: nn.Module, config: TrainConfig, device: torch.device, warnings: list[str]) -> tuple[Callable[[], None], int | None]:
    """Turn on gradient checkpointing (``True``, or ``"auto"`` when memory is tight) and pick the loss
    chunk (``None``: full logits); returns the undo of checkpointing and the chunk."""
    checkpointing = config.gradient_checkpointing
    if checkpointing == "auto":  # on when memory is tight and the model can do it; says so
        on, why = auto_checkpointing(work, config.batch_size, config.seq_len, device)
        checkpointing = on and callable(getattr(work, "gradient_checkpointing_enable", None))
        if checkpointing:
            warnings.append(f"gradient checkpointing is on: {why} (gradient_checkpointing=False turns it off)")
    undo = _enable_checkpointing(work, warnings) if checkpointing else (lambda: None)
    head = output_head(work)
    chunk_setting = config.loss_chunk_tokens
    if chunk_setting == "auto" and head is not None:
        weight = getattr(head, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
        chunk_on, _ = auto_loss_chunking(config.batch_size * config.seq_len, vocab, device)
        chunk_setting = LOSS_CHUNK_TOKENS if chunk_on else None
    chunk = None if head is None or chunk_setting is None else chunk_tokens(int(chunk_setting), head)
    return undo, chunk


def _step(
    state: TrainState, run: tuple[nn.Module, Any], work: nn.Module, params: Sequence[nn.Parameter], par: Parallel,
    device: torch.device, autocast: Callable[[], Any], chunked: int | None, loss_fn: LossFn | None,
) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's loss and input tokens."""
    config, batches = state.config, state.batches
    run_model, run_optimizer = run  # the model and optimizer as DDP / accelerate wrapped them
    host = [next(batches) for _ in range(config.grad_accum)]
    # counted on the host batches, before they move: no device sync unless ranks must agree
    counts = [sum(count_targets(b["labels"]) for b in host), sum(_input_tokens(b) for b in host)]
    if par.distributed:
        local = torch.tensor(counts, dtype=torch.float64, device=device)
        counts = [int(x) for x in par.sum(local).tolist()]
    targets, tokens = counts
    micro = [_to(b, device) for b in host]
    if loss_fn is None and targets == 0:
        raise TrainingError(f"step {state.step + 1} has no target tokens (all labels are -100); check the data")
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        with par.no_sync(run_model, skip=i < len(micro) - 1):
            with autocast():
                if loss_fn is None:
                    summed = _lm_loss_sum(run_model, work, batch, chunked)
                    loss = summed * (par.world_size / targets)
                    loss_total += summed.detach().double()
                else:
                    loss = loss_fn(run_model, batch) / len(micro)
                    loss_total += loss.detach().double()
            par.backward(loss)
    if config.max_grad_norm is not None:
        par.clip(params, config.max_grad_norm)
    run_optimizer.step()
    run_optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.step += 1
    step_loss = float(par.sum(loss_total)) / (targets if loss_fn is None else par.world_size)
    if step_loss != step_loss or step_loss in (float("inf"), float("-inf")):
        raise TrainingError(
            f"the loss is {step_loss} at step {state.step}; lower config.lr, keep max_grad_norm set, or use bf16=False"
        )
    return step_loss, tokens


def train(
    model: nn.Module,
    batches: BatchStream,
    config: TrainConfig,
    *,
    hooks: Sequence[TrainHook] = (),
    progress: Progress = None,
    accelerator: Any = None,
    loss_fn: LossFn | None = None,
    run_options: Mapping[str, Any] | None = None,
    parallel: str | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``config.steps`` steps; see the module doc.

    ``hooks`` see a :class:`TrainState` after every optimizer step; ``progress`` gets a report every
    ``config.log_every`` steps; ``accelerator`` (an ``accelerate.Accelerator``) makes the run
    data-parallel (also detected from an initialised ``torch.distributed``); ``loss_fn`` replaces
    the token-summed causal-LM loss; ``run_options`` (JSON-able) are the caller's options that change
    the result beyond ``config`` (a pass's ratio, ...): a checkpoint of other options is not resumed;
    ``parallel`` is ``"ddp"`` or ``"fsdp"`` (default: from the environment, see
    :func:`~shear.training.distributed.requested_strategy`).
    The model is left in the train/eval mode it came in.
    """
    warnings: list[str] = []
    hooks = list(hooks)
    par = detect_parallel(accelerator, parallel)
    params = select_trainable(model, warnings)
    given = batches
    batches = _check_stream(batches, config, par)
    device = _device_of(model, par)
    bf16 = resolve_bf16(config, device)
    work = model
    if par.sharded:  # FSDP2: train a sharded copy; its whole weights go back into ``model`` at the end
        work = shard_copy(model, fsdp_mesh(par.device))
        params = [p for p in work.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config.scheduler, warmup_steps=config.warmup_steps, total_steps=config.steps)
    state = TrainState(
        model=work, optimizer=optimizer, scheduler=scheduler, config=config, rank=par.rank,
        world_size=par.world_size, accelerator=accelerator, batches=batches,
        source=model if par.sharded else None,
    )
    ckpt, run = _resume_or_seed(model, state, hooks, config, par, run_options, warnings)

    was_training = model.training
    undo_checkpointing, chunked = _memory_savers(work, config, device, warnings)
    work.train()
    prepared = par.prepare(work, optimizer)
    for hook in hooks:
        hook.on_train_start(state)
    if ckpt is not None:  # after on_train_start, so its random draws do not shift the resumed stream
        restore_rng(ckpt.state["rng"], ckpt.info["rng"])
        del ckpt.model_state

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    start_step, start_tokens = state.step, state.tokens
    t0 = time.perf_counter()
    with ExitStack() as stack:
        meter = stack.enter_context(PeakMemory(device))
        bar = stack.enter_context(_progress(progress, config.steps, par.is_main))
        if bar is not None and start_step and hasattr(bar, "advance"):
            bar.advance(start_step)
        while state.step < config.steps:
            step_loss, tokens = _step(state, prepared, work, params, par, device, autocast, chunked, loss_fn)
            state.losses.append(step_loss)
            state.tokens += tokens
            for hook in hooks:
                hook.after_optimizer_step(state)
            log = None
            if state.step % config.log_every == 0 or state.step == config.steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                log = StepLog(state.step, config.steps, step_loss, float(scheduler.get_last_lr()[0]),
                              (state.tokens - start_tokens) / elapsed)
            _report(bar, log, 1)
            if config.checkpoint_every and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
                _save(state, hooks, config, run, par)
                par.barrier()
        wall = time.perf_counter() - t0
    for hook in hooks:
        hook.on_train_end(state)
    undo_checkpointing()
    if work is not model:
        write_back(work, model)
    if batches is not given:  # a rank's shard is a copy: the caller's stream continues where the run ended
        given.load_state_dict(batches.state_dict())
    model.train(was_training)
    stats = meter.stats
    return TrainResult(
        steps=state.step, losses=list(state.losses), tokens=state.tokens, wall_s=wall,
        tokens_per_s=(state.tokens - start_tokens) / wall if wall > 0 else 0.0,
        peak_memory_bytes=stats.peak_bytes, memory=stats, warnings=warnings,
        resumed_from=Path(ckpt.path) if ckpt is not None else None,
        resumed_step=start_step,
    )
