"""Low-precision models are first class: erase, verify and the LoRAShear pipeline in bf16 and fp16.

Verification runs a 16-bit model in fp32 one block at a time (``verify.upcast``), so a right erase
passes at fp32 noise and a planted wrong one (a different structure dropped than the one zeroed)
fails with VerifyError, in every dtype. The whole LoRAShear pipeline runs on a bf16 model on the
CPU: frozen weights stay bf16, adapters fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import shear
from shear.codegen import verify
from shear.codegen.module_tree import apply_plan, plan_erasure
from shear.data import TextData
from shear.errors import VerifyError
from shear.graph.trace import trace
from shear.model.tensors import TensorTable, zero_structures
from shear.training import ensure_lora
from shear.zoo import load_tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {"input_ids": torch.arange(3, 35).view(2, 16)}


@pytest.fixture(scope="module")
def tiny_llama():
    model, tok, _, _ = load_tiny_llama()
    return model, tok


def _llama_shape() -> transformers.LlamaForCausalLM:
    """A LLaMA-shaped config of four layers with random weights (GQA 8/4 heads, SwiGLU)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=512, max_position_embeddings=64, use_cache=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _models(tiny_llama):
    return {"tiny": tiny_llama[0], "llama-shape": _llama_shape()}


def _planted(model: torch.nn.Module, dtype: torch.dtype, *, wrong: bool) -> tuple:
    """The masked model (every 4th structure zeroed) and an erased copy; ``wrong`` erases, in the last
    MLP, structure 1 instead of the zeroed structure 0: one channel of thousands, a subtle error."""
    masked = copy.deepcopy(model).to(dtype)
    graph = trace(masked, IDS)
    table = TensorTable(masked)
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    last_mlp = [g for g in groups if g.kind == "channel"][-1]
    decoy = copy.deepcopy(masked)
    for g in groups:
        idx = torch.arange(0, g.size, 4)
        zero_structures(table, g, idx)
        zero_structures(TensorTable(decoy), g, torch.cat([idx[1:], idx[:1] + 1]) if wrong and g is last_mlp else idx)
    plan = plan_erasure(decoy, graph.pruning_groups)
    small = copy.deepcopy(masked)
    apply_plan(small, plan)
    return masked, small


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["tiny", "llama-shape"])
def test_a_right_erase_verifies_and_a_wrong_one_fails_in_every_dtype(tiny_llama, name, dtype):
    model = _models(tiny_llama)[name]
    masked, small = _planted(model, dtype, wrong=False)
    recording = verify.record(masked, IDS)
    assert all(t.dtype == torch.float32 for t in recording.final if t.is_floating_point()) or dtype == torch.float32
    diff = verify.check(small, recording, IDS)
    assert diff <= verify.allowed(max(float(t.abs().max()) for t in recording.final if t.is_floating_point()))
    assert next(small.parameters()).dtype == dtype  # verification left the weights in their dtype

    masked, small = _planted(model, dtype, wrong=True)
    with pytest.raises(VerifyError, match="small model differs from the masked original"):
        verify.check(small, verify.record(masked, IDS), IDS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_verification_in_small_pieces_still_fails_a_wrong_erase(monkeypatch, tiny_llama, dtype):
    """With a tiny conversion budget every block is converted layer by layer and the output head in
    row blocks (as a 128k-vocabulary head or a 7B block is): the same verdicts, the same recording."""
    model = _models(tiny_llama)["llama-shape"]
    masked, small = _planted(model, dtype, wrong=False)
    whole = verify.record(masked, IDS)
    monkeypatch.setattr(verify, "UPCAST_BLOCK_BYTES", 4096)
    assert all(not isinstance(u, transformers.models.llama.modeling_llama.LlamaDecoderLayer)
               for u, _ in verify._units(masked))
    pieces = verify.record(masked, IDS)
    torch.testing.assert_close(pieces.final[0], whole.final[0], rtol=0, atol=1e-5)
    assert verify.check(small, pieces, IDS) <= verify.allowed(float(pieces.final[0].abs().max()))
    assert "forward" not in masked.lm_head.__dict__ and {p.dtype for p in masked.parameters()} == {dtype}

    masked, small = _planted(model, dtype, wrong=True)
    with pytest.raises(VerifyError, match="small model differs from the masked original"):
        verify.check(small, verify.record(masked, IDS), IDS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compile_erases_a_16_bit_model_and_verifies_it(tiny_llama, dtype):
    model = _llama_shape().to(dtype)
    small = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0,kinds=[channel,head]},erase", example_inputs=IDS)
    report = small.shear_report
    assert report.verify_max_diff is not None and report.verify_max_diff <= 1e-3
    assert {p.dtype for p in small.parameters()} == {dtype}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_narrower_residual_stream_verifies_in_16_bits(dtype):
    """Erasing residual channels rescales the RMS norms; in 16 bits that rounding is a real change,
    which verification accounts for exactly (it is not an erasure error)."""
    model = _llama_shape().to(dtype)
    small = shear.compile(model, "discover-groups,random{ratio=0.25,seed=0,kinds=[residual]},erase", example_inputs=IDS)
    assert small.config.hidden_size < model.config.hidden_size
    assert small.shear_report.verify_max_diff is not None and small.shear_report.verify_max_diff <= 1e-3


def test_upcast_holds_one_block_in_fp32_at_a_time():
    model = _llama_shape().bfloat16()
    seen: list[int] = []

    def count(*_args) -> None:
        seen.append(sum(1 for p in model.parameters() if p.dtype == torch.float32))

    handles = [b.register_forward_hook(lambda *a: count()) for b in model.model.layers]
    with torch.no_grad(), verify.upcast(model):
        out = model(**IDS).logits
    for h in handles:
        h.remove()
    per_block = sum(1 for _ in model.model.layers[0].parameters())
    assert out.dtype == torch.float32 and seen and max(seen) <= per_block
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


PIPELINE = (
    "lora{r=4},discover-groups,"
    "lhspg{ratio=0.3,periods=2,steps_per_period=2,warmup=1,batch_size=2,seq_len=32,lr=0.002,calibration=2},"
    "erase,"
    "recover-dynamic{stages=pretrain+instruct,max_rounds=1,steps_per_round=1,batch_size=2,seq_len=32,eval_windows=1}"
)


def test_lorashear_pipeline_on_a_bf16_model(tiny_llama):
    model, tok = tiny_llama
    data = TextData.from_corpus(tok, max_train_chars=20_000, max_val_chars=3_000, instructions=16)
    small = shear.compile(copy.deepcopy(model).bfloat16(), PIPELINE, example_inputs=IDS, data=data)
    report = small.shear_report
    assert [r.name for r in report.passes][-2:] == ["erase", "recover-dynamic"]
    assert report.verify_max_diff is not None and report.verify_max_diff <= 1e-3
    frozen = {n: p.dtype for n, p in small.named_parameters() if "lora_" not in n}
    adapters = {n: p.dtype for n, p in small.named_parameters() if "lora_" in n}
    assert set(frozen.values()) == {torch.bfloat16}
    assert adapters and set(adapters.values()) == {torch.float32}
    ppl = data.perplexity(small, seq_len=32, max_windows=1)
    assert all(1 < v < 4096 for v in ppl.values())


def test_lora_on_a_bf16_model_keeps_adapters_fp32(tiny_llama):
    model, _ = ensure_lora(copy.deepcopy(tiny_llama[0]).bfloat16(), r=4)
    dtypes = {("lora" if "lora_" in n else "base"): p.dtype for n, p in model.named_parameters()}
    assert dtypes == {"base": torch.bfloat16, "lora": torch.float32}


def test_taylor_saliency_of_a_bf16_model_keeps_no_gradient_copy(tiny_llama):
    """16-bit weights: taylor1's gradients are consumed as autograd finishes each one (at most one
    exists at a time) and agree with the full-gradient path (which keeps them all) to float rounding."""
    from shear.kernels import saliency, saliency_signals

    model, tok = tiny_llama
    data = TextData.from_corpus(tok, max_train_chars=20_000, max_val_chars=3_000)
    lora_model, _ = ensure_lora(copy.deepcopy(model).bfloat16(), r=4)
    graph = trace(lora_model, IDS)
    groups = [g for g in graph.prunable_groups if g.kind in ("channel", "head")]
    ids = data.calibration(4, 32, seed=0)
    alive: list[int] = []
    real = saliency_signals.rowsum

    def spy(t, dim):
        alive.append(sum(1 for p in lora_model.parameters() if p.grad is not None))
        return real(t, dim)

    saliency_signals.rowsum = spy
    try:
        streamed = saliency.compute_saliency(lora_model, groups, weights="taylor1=1", calibration_ids=ids,
                                             composites=graph.composites, batch_size=2)
    finally:
        saliency_signals.rowsum = real
    assert alive and max(alive) == 0  # the gradient being reduced was already taken off its parameter
    kept = saliency.compute_saliency(lora_model, groups, weights="taylor1=1,taylor2=1e-9", calibration_ids=ids,
                                     composites=graph.composites, batch_size=2)
    for gid, v in kept.criteria["taylor1"].items():
        torch.testing.assert_close(streamed.criteria["taylor1"][gid], v, rtol=1e-2, atol=1e-2 * float(v.abs().max()))
    assert all(p.grad is None for p in lora_model.parameters())


def test_chunked_weight_scans_agree_with_whole_tensor_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's zero test and the preflight's finiteness test read big tensors in chunks (no
    embedding-sized copy); with chunks of a few elements they still see every entry."""
    import shear.report.summary as report
    from shear.graph.groups import Member, PruningGroup, Role
    from shear.preflight import _all_finite

    t = torch.randn(7, 5, dtype=torch.bfloat16)
    assert _all_finite(t, chunk=3)
    t[6, 4] = float("nan")  # in the last chunk
    assert not _all_finite(t, chunk=3) and not _all_finite(t)

    w = torch.randn(6, 10)
    w[:, [1, 4]] = 0  # columns 1 and 4 (structures of width 1 along dim 1) are zero
    w[5, 3] = 0  # a zero entry in a live column does not make it zero
    positions = torch.arange(10).view(10, 1)
    group = PruningGroup(id=0, name="g", members=(Member("w", 1, Role.PRIMARY, positions),), size=10, kind="channel")
    monkeypatch.setattr(report, "_CHUNK_ELEMENTS", 4)  # chunks of one row
    assert report.zero_structures(group, {"w": w}) == (1, 4)
    w[5, 1] = float("nan")  # NaN is not zero, even in the last chunk
    assert report.zero_structures(group, {"w": w}) == (4,)
