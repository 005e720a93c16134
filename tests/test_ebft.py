"""EBFT: block-wise reconstruction of pruned decoders against the dense teacher (shear.passes.finetune.ebft).

Tiny seeded LLaMA-family models from configs; calibration ids drawn with torch.randint over the
tiny vocabulary (and, once, real text from the committed corpus through a character tokenizer).
Checks: every block's reconstruction error goes down (never up), the last hidden state moves
toward the dense model's on held-out ids, pruned weights stay exactly zero, 2:4 patterns and
erased shapes survive, the dense teacher is untouched, and bad input fails with a clear error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from models import VOCAB, build
from torch import nn

import shear
from shear.errors import DataError, KernelError, ModelError, PipelineError
from shear.kernels.ebft import (
    block_mse,
    block_reconstruct,
    capture_block_inputs,
    infer_masks,
    run_block,
)
from shear.model.blocks import decoder_blocks
from shear.passes import parse_pipeline
from shear.passes.base import Context, Pass, PassResult
from shear.passes.baselines.random import zero_random
from shear.passes.finetune.ebft import EBFT, EBFTReport, KeepDense
from shear.progress import ProgressBar

FAST: dict[str, Any] = dict(lr=1e-3, epochs=8, batch_size=4)


@dataclass(frozen=True)
class RandomInner(Pass):
    """``random`` without the residual width (block outputs must stay comparable); unregistered."""

    name: ClassVar[str] = "random-inner"
    requires: ClassVar[tuple[str, ...]] = ("graph",)
    ratio: float = 0.3

    def run(self, ctx: Context) -> PassResult:
        groups = tuple(g for g in ctx.results["graph"].pruning_groups if g.kind != "residual")
        chosen = zero_random(ctx.model, groups, self.ratio, seed=0)
        return PassResult(changed=True, message=f"zeroed {sum(v.numel() for v in chosen.values())} structures")


STRUCTURED: list[Any] = ["discover-groups", RandomInner(0.3), "erase"]


def _ids(n: int = 16, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


@torch.no_grad()
def _magnitude(model: nn.Module, sparsity: float = 0.5) -> nn.Module:
    """Zero the smallest ``sparsity`` of every Linear weight inside the decoder blocks."""
    for _, m in _block_linears(model):
        w = m.weight
        k = int(sparsity * w.numel())
        thr = w.abs().flatten().kthvalue(k).values
        w.mul_(w.abs() > thr)
    return model


@torch.no_grad()
def _n_of_m(model: nn.Module, n: int = 2, m: int = 4) -> nn.Module:
    """Keep the ``n`` largest of every ``m`` consecutive input weights of each block Linear."""
    for _, lin in _block_linears(model):
        w = lin.weight.view(-1, m)
        drop = w.abs().argsort(dim=1)[:, : m - n]
        w.scatter_(1, drop, 0.0)
    return model


def _zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p == 0).clone() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}


@torch.no_grad()
def _last_hidden_err(model: nn.Module, dense: nn.Module, ids: torch.Tensor) -> float:
    a = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    b = dense(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    return float(((a - b) ** 2).mean())


def _ebft(student: nn.Module, dense: nn.Module, data: Any = None, **options: Any) -> tuple[Context, EBFTReport, Any]:
    ctx = Context(model=student, data=_ids() if data is None else data, results={"dense-model": dense})
    result = EBFT(**{**FAST, **options}).run(ctx)
    return ctx, ctx.results["ebft"], result


def _assert_improves(report: EBFTReport, stats: dict[str, Any]) -> None:
    assert report.blocks, "no block was tuned"
    for b in report.blocks:
        assert b.mse_after <= b.mse_before, b
    assert stats["mse_after"] < stats["mse_before"]
    assert report.output_mse_after < report.output_mse_before


# -- the three kinds of pruning ------------------------------------------------------------------


def test_unstructured_sparse_model_recovers_and_stays_sparse() -> None:
    dense, _ = build("llama")
    reference = copy.deepcopy(dense.state_dict())
    student = _magnitude(copy.deepcopy(dense))
    zeros = _zeros(student)
    held_out = _ids(8, 32, seed=7)
    err_before = _last_hidden_err(student, dense, held_out)

    _, report, result = _ebft(student, dense)

    _assert_improves(report, result.stats)
    assert result.changed and len(result.stats["blocks"]) == 2
    assert _last_hidden_err(student, dense, held_out) < err_before  # generalises beyond the calibration ids
    for name, p in student.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), f"{name}: a pruned weight came back"
            assert float((p == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    for k, v in dense.state_dict().items():  # the teacher is never touched
        assert torch.equal(v, reference[k]), k


def test_n_of_m_pattern_is_preserved() -> None:
    dense, _ = build("llama")
    student = _n_of_m(copy.deepcopy(dense))
    zeros = _zeros(student)

    _, report, result = _ebft(student, dense)

    _assert_improves(report, result.stats)
    for name, lin in _block_linears(student):
        groups = lin.weight.view(-1, 4)
        assert bool(((groups == 0).sum(dim=1) >= 2).all()), f"{name}: 2:4 pattern broken"
        assert torch.equal(lin.weight == 0, zeros[f"{name}.weight"]), name


@pytest.mark.parametrize("residual", [False, True], ids=["inner", "residual-pruned"])
def test_structured_erased_model_keeps_its_shapes(residual: bool) -> None:
    dense, inputs = build("llama")
    pipeline = ["discover-groups", "random{ratio=0.3,seed=0}", "erase"] if residual else STRUCTURED
    small = shear.compile(copy.deepcopy(dense), pipeline, example_inputs=inputs)
    shapes = {n: tuple(p.shape) for n, p in small.named_parameters()}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())
    assert (small.get_input_embeddings().weight.shape[1] < 64) == residual

    if residual:  # through compile: the erase report says which residual channels were kept
        small = shear.compile(dense, [*pipeline, "ebft{lr=0.001,epochs=8}"], example_inputs=inputs, data=_ids())
        stats = next(r for r in small.shear_report.passes if r.name == "ebft").stats  # type: ignore[union-attr]
        assert all(b["mse_after"] <= b["mse_before"] for b in stats["blocks"])
        assert stats["output_mse_after"] < stats["output_mse_before"]
        assert {n: tuple(p.shape) for n, p in small.named_parameters()} == shapes
        with pytest.raises(PipelineError, match="no erase report"):  # without it: refused
            EBFT(**FAST).run(Context(model=small, data=_ids(), results={"dense-model": dense}))
        return
    held_out = _ids(8, 32, seed=7)
    err_before = _last_hidden_err(small, dense, held_out)

    _, report, result = _ebft(small, dense)

    _assert_improves(report, result.stats)
    assert {n: tuple(p.shape) for n, p in small.named_parameters()} == shapes
    assert _last_hidden_err(small, dense, held_out) < err_before


def test_through_compile_uses_the_callers_model_as_teacher() -> None:
    dense, inputs = build("llama")
    reference = copy.deepcopy(dense.state_dict())
    small = shear.compile(
        dense,
        [*STRUCTURED, "ebft{lr=0.001,epochs=8,batch_size=4}"],
        example_inputs=inputs,
        data=_ids(),
    )
    record = next(r for r in small.shear_report.passes if r.name == "ebft")  # type: ignore[union-attr]
    assert record.stats["output_mse_after"] < record.stats["output_mse_before"]
    assert all(b["mse_after"] <= b["mse_before"] for b in record.stats["blocks"])
    for k, v in dense.state_dict().items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2", "opt"])
def test_other_decoders(arch: str) -> None:
    dense, _ = build(arch)
    student = copy.deepcopy(dense)
    with torch.no_grad():  # unstructured 50% on every 2-D weight inside the blocks (Linear or Conv1D)
        for p in decoder_blocks(student).parameters():
            if p.dim() == 2:
                k = p.numel() // 2
                p.mul_(p.abs() > p.abs().flatten().kthvalue(k).values)
    zeros = {n: (p == 0).clone() for n, p in decoder_blocks(student).named_parameters() if p.dim() == 2}

    _, report, result = _ebft(student, dense)

    _assert_improves(report, result.stats)
    for n, p in decoder_blocks(student).named_parameters():  # zero-initialised biases may train
        if n in zeros:
            assert bool((p[zeros[n]] == 0).all()), n


def test_real_text_through_compile() -> None:
    """Calibration windows of the committed corpus, tokenised per character into the tiny vocab."""
    from shear.data import TextData

    class CharTokenizer:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) % (VOCAB - 1) + 1 for c in text]}

    data = TextData.from_corpus(CharTokenizer(), sources=["kjv", "pydocs"], max_train_chars=4_000, max_val_chars=2_000)
    dense, inputs = build("llama")
    small = shear.compile(
        dense,
        [*STRUCTURED, "ebft{nsamples=16,seq_len=32,lr=0.001,epochs=8}"],
        example_inputs=inputs,
        data=data,
    )
    record = next(r for r in small.shear_report.passes if r.name == "ebft")  # type: ignore[union-attr]
    assert record.stats["samples"] == 16 and record.stats["seq_len"] == 32
    assert record.stats["mse_after"] < record.stats["mse_before"]
    assert all(b["mse_after"] <= b["mse_before"] for b in record.stats["blocks"])
    ppl = data.perplexity(small, seq_len=32, max_windows=4)
    assert set(ppl) == {"kjv", "pydocs"} and all(0 < v < 2 * VOCAB for v in ppl.values())


def test_trained_tiny_llama_perplexity_recovers() -> None:
    """Real weights and text (shear's tiny trained LLaMA) through shear.compile and the magnitude pass.

    Measured (4 windows of 128 tokens per source): dense kjv 24.7; 70% unstructured magnitude 48.7,
    then EBFT 29.8; 30% structured magnitude + erase (residual included) 284, then EBFT 59.
    """
    from shear.data import TextData
    from shear.zoo import load_tiny_llama

    model, tokenizer, _, _ = load_tiny_llama()
    data = TextData.from_corpus(tokenizer, sources=["kjv", "shakespeare"], max_train_chars=30_000, max_val_chars=10_000)
    ebft = "ebft{nsamples=8,seq_len=128,lr=0.003,epochs=5}"

    def ppl(m: nn.Module) -> float:
        return sum(data.perplexity(m, seq_len=128, max_windows=2).values())

    for prune in ("magnitude{ratio=0.7,mode=unstructured}", "magnitude{ratio=0.2},erase"):
        pruned = shear.compile(model, prune, data=data)
        tuned = shear.compile(model, f"{prune},{ebft}", data=data)
        assert ppl(tuned) < 0.8 * ppl(pruned), prune
        if "unstructured" in prune:  # WeightMasks from the magnitude pass: sparsity kept exactly
            for (n, p), q in zip(tuned.named_parameters(), pruned.parameters(), strict=True):
                if ".layers." in n and p.dim() == 2:
                    assert torch.equal(p == 0, q == 0), n


# -- options ---------------------------------------------------------------------------------


def test_explicit_masks_win_over_zeros() -> None:
    dense, _ = build("llama")
    student = _magnitude(copy.deepcopy(dense), 0.25)
    name = "model.layers.0.mlp.up_proj.weight"
    keep = student.get_parameter(name) != 0
    keep[:, : keep.shape[1] // 2] = False  # the sparsity pass says: half the columns are pruned
    ctx = Context(model=student, data=_ids(), results={"dense-model": dense, "masks": SimpleNamespace(masks={name: keep})})
    EBFT(**FAST).run(ctx)
    w = student.get_parameter(name)
    assert bool((w[~keep] == 0).all()) and bool((w[keep] != 0).any())


def test_lora_mode_tunes_only_the_adapters() -> None:
    dense, _ = build("llama", lora=True)
    student = copy.deepcopy(dense)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".layers." in n and "lora_" not in n and p.dim() == 2:
                p.mul_(p.abs() > p.abs().flatten().kthvalue(p.numel() // 2).values)
    base = {n: p.clone() for n, p in student.named_parameters() if "lora_" not in n}
    lora = {n: p.clone() for n, p in student.named_parameters() if "lora_" in n}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}

    ctx, report, result = _ebft(student, dense, train="lora")

    _assert_improves(report, result.stats)
    params = dict(student.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    assert any("revives pruned weights" in w for w in ctx.warnings)


def test_bf16_model_trains_through_fp32_masters() -> None:
    dense, _ = build("llama")
    student = _magnitude(copy.deepcopy(dense)).to(torch.bfloat16)
    zeros = _zeros(student)
    _, report, result = _ebft(student, dense.to(torch.bfloat16))
    _assert_improves(report, result.stats)
    assert result.stats["output_mse_after"] < 0.5 * result.stats["output_mse_before"]
    for name, p in student.named_parameters():
        assert p.dtype == torch.bfloat16
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name


def test_too_large_lr_restores_the_block() -> None:
    dense, _ = build("llama")
    student = _magnitude(copy.deepcopy(dense))
    state = copy.deepcopy(student.state_dict())
    ctx, report, result = _ebft(student, dense, lr=50.0, epochs=2)
    assert all(b.restored and b.mse_after == b.mse_before for b in report.blocks)
    assert not result.changed and any("worse" in w for w in ctx.warnings)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_keep_dense_provides_the_teacher_for_inplace_pipelines() -> None:
    dense, inputs = build("llama")
    model = copy.deepcopy(dense)
    out = shear.compile(model, ["keep-dense", *STRUCTURED, "ebft{lr=0.001,epochs=4}"],
                        example_inputs=inputs, data=_ids(), inplace=True)
    record = next(r for r in out.shear_report.passes if r.name == "ebft")  # type: ignore[union-attr]
    assert record.stats["output_mse_after"] < record.stats["output_mse_before"]
    ctx = Context(model=model, results={"dense-model": dense})
    assert KeepDense().run(ctx).changed is False and ctx.results["dense-model"] is dense


def test_progress_bar_per_block() -> None:
    seen: list[tuple[int, int | None]] = []

    class Sink:
        def start(self, bar: ProgressBar) -> None: ...
        def update(self, bar: ProgressBar) -> None:
            seen.append((bar.completed, bar.total))
        def stop(self, bar: ProgressBar) -> None: ...

    dense, _ = build("llama")
    ctx = Context(model=_magnitude(copy.deepcopy(dense)), data=_ids(8), results={"dense-model": dense}, progress_sink=Sink())
    EBFT(**{**FAST, "epochs": 1}).run(ctx)
    assert (2, 2) in seen


# -- the runtime functions -------------------------------------------------------------------


def test_decoder_blocks_and_capture() -> None:
    model: Any = build("llama", lora=True)[0]
    blocks = decoder_blocks(model)
    assert len(blocks) == 2 and blocks is model.get_base_model().model.layers
    ids = _ids(6, 16)
    inputs = capture_block_inputs(model, ids, batch_size=4)
    assert [tuple(h.shape) for h in inputs.hidden] == [(4, 16, 64), (2, 16, 64)]
    assert "position_embeddings" in inputs.kwargs[1][0]
    with torch.no_grad():  # replaying the captured arguments reproduces the model's own block output
        y = [run_block(blocks[0], h, inputs.args[0][c], inputs.kwargs[0][c]) for c, h in enumerate(inputs.hidden)]
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[1]
    assert torch.allclose(torch.cat(y), ref, atol=1e-5)


def test_block_reconstruct_masks_and_never_worse() -> None:
    torch.manual_seed(0)
    student: Any = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        student[0].weight[:, :4] = 0
    masks = infer_masks(student)
    assert masks["0.bias"] is None and masks["2.weight"] is None and masks["0.weight"] is not None
    xs = [torch.randn(4, 8) for _ in range(4)]
    with torch.no_grad():
        ys = [teacher(x) for x in xs]
    r = block_reconstruct(student, ys, xs, masks, lr=1e-2, epochs=20)
    assert r.mse_after < r.mse_before and r.steps == 80 and len(r.losses) == 20
    assert r.mse_after == pytest.approx(block_mse(student, xs, ys))
    assert bool((student[0].weight[:, :4] == 0).all())
    with pytest.raises(KernelError, match="as many input chunks"):
        block_reconstruct(student, ys[:2], xs, masks)
    with pytest.raises(KernelError, match="residual widths"):
        block_reconstruct(student, [y[:, :4] for y in ys], xs, masks)


def test_all_zero_tensors_count_as_unpruned() -> None:
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.bias.zero_()
    assert infer_masks(lin)["bias"] is None


# -- errors ----------------------------------------------------------------------------------


def test_no_data_is_a_data_error() -> None:
    dense, _ = build("llama")
    ctx = Context(model=copy.deepcopy(dense), results={"dense-model": dense})
    with pytest.raises(DataError, match="pass 'ebft' needs text data"):
        EBFT().run(ctx)
    ctx.data = torch.zeros(4, 8)
    with pytest.raises(DataError, match=r"must be \[n, seq_len\] long"):
        EBFT().run(ctx)


def test_missing_or_wrong_teacher() -> None:
    dense, inputs = build("llama")
    with pytest.raises(PipelineError, match="holds no 'dense-model'.*add a pass that ensures it \\('keep-dense'\\)"):
        EBFT().run(Context(model=dense, data=_ids()))
    with pytest.raises(PipelineError, match="is the model being tuned"):
        EBFT().run(Context(model=dense, data=_ids(), results={"dense-model": dense}))
    with pytest.raises(PipelineError, match="must be the dense nn.Module"):
        EBFT().run(Context(model=dense, data=_ids(), results={"dense-model": "dense"}))
    with pytest.raises(PipelineError, match="pass 'ebft' requires result 'dense-model'.*'keep-dense'"):  # inplace: no teacher
        shear.compile(copy.deepcopy(dense), "ebft", example_inputs=inputs, data=_ids(), inplace=True)


def test_model_without_decoder_blocks() -> None:
    cnn, _ = build("cnn")
    with pytest.raises(ModelError, match="TinyResNet has no decoder blocks"):
        decoder_blocks(cnn)
    with pytest.raises(ModelError, match="TinyResNet has no decoder blocks"):
        EBFT().run(Context(model=cnn, data=_ids(), results={"dense-model": copy.deepcopy(cnn)}))


def test_pruned_residual_width_or_block_count_is_refused() -> None:
    import transformers as tf

    dense, _ = build("llama")
    narrow = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    with pytest.raises(PipelineError, match="residual width is 32 and the dense model's 64"):
        EBFT(**FAST).run(Context(model=narrow, data=_ids(), results={"dense-model": dense}))
    shallow: Any = copy.deepcopy(dense)
    del shallow.model.layers[1]
    with pytest.raises(PipelineError, match="student has 1 decoder blocks and the dense teacher 2"):
        EBFT(**FAST).run(Context(model=shallow, data=_ids(), results={"dense-model": dense}))


def test_lora_without_adapters_and_bad_options() -> None:
    dense, _ = build("llama")
    with pytest.raises(KernelError, match="no LoRA adapters"):
        EBFT(train="lora").run(Context(model=copy.deepcopy(dense), data=_ids(), results={"dense-model": dense}))
    with pytest.raises(PipelineError, match="epochs must be positive"):
        parse_pipeline("ebft{epochs=0}")
    with pytest.raises(PipelineError, match="lr must be positive"):
        EBFT(lr=0.0)
    with pytest.raises(PipelineError):
        parse_pipeline("ebft{train=bias}")


@pytest.mark.slow
def test_smollm2_slice_perplexity_recovers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Real weights and text: SmolLM2's first 4 blocks, 50% magnitude sparsity, then EBFT."""
    from model_fixtures import load_smollm2_layers

    from shear.data import TextData

    dense: Any
    dense, tokenizer = load_smollm2_layers(tmp_path_factory, 4)
    data = TextData.from_corpus(tokenizer, max_train_chars=100_000, max_val_chars=20_000)
    student = _magnitude(copy.deepcopy(dense))
    zeros = _zeros(student)
    pruned = data.perplexity(student, seq_len=128, max_windows=4)
    ctx = Context(model=student, data=data, results={"dense-model": dense})
    result = EBFT(nsamples=32, seq_len=128, lr=2e-4, epochs=5).run(ctx)
    _assert_improves(ctx.results["ebft"], result.stats)
    tuned = data.perplexity(student, seq_len=128, max_windows=4)
    assert sum(tuned.values()) < sum(pruned.values()), (pruned, tuned)
    for name, p in student.named_parameters():
        if name in zeros:
            assert bool((p[zeros[name]] == 0).all()), name
