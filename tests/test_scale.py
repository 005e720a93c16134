"""Planning without the weights and pruning streamed from safetensors shards (shear.scale)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import shear
from shear.cli import main
from shear.errors import CheckpointError, GraphError, OutputError, PipelineError
from shear.graph import trace
from shear.graph.groups import GROUP_KINDS
from shear.graph.stamp import stamp_layers
from shear.scale.shards import ShardedCheckpoint
from shear.scale.writer import SafetensorsWriter

VOCAB = 96
LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248,
    "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def _config(arch: str, layers: int, tied: bool = False) -> Any:
    import transformers as tf

    common: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=8,
                                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                  tie_word_embeddings=tied)
    if arch == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **common), tf.MistralForCausalLM
    raise KeyError(arch)


def _model(arch: str, layers: int = 4, tied: bool = False) -> torch.nn.Module:
    cfg, cls = _config(arch, layers, tied)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # fresh norms are all ones: make erasure's rescale visible
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir()) if f.is_file()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_stamped_groups_equal_a_full_trace(arch: str) -> None:
    cfg, cls = _config(arch, 7)
    with torch.device("meta"):
        full_model = cls(cfg)
    cfg2, _ = _config(arch, 2)
    with torch.device("meta"):
        two = cls(cfg2)
    x = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    full = trace(full_model, x)
    stamped = stamp_layers(trace(two, x), "model.layers", 7)
    assert len(stamped.pruning_groups) == len(full.pruning_groups)
    by_name = {g.name: g for g in full.pruning_groups}
    for g in stamped.pruning_groups:
        f = by_name[g.name]
        assert (f.size, f.kind, f.prunable) == (g.size, g.kind, g.prunable)
        assert [(m.param, m.dim, m.role) for m in f.members] == [(m.param, m.dim, m.role) for m in g.members]
        assert all(torch.equal(a.positions, b.positions) for a, b in zip(f.members, g.members, strict=True))
        assert sorted(map(str, f.norms)) == sorted(map(str, g.norms))
    assert stamped.shapes == full.shapes


def test_stamping_refuses_a_template_that_is_not_two_blocks() -> None:
    cfg, cls = _config("llama", 3)
    with torch.device("meta"):
        three = cls(cfg)
    with pytest.raises(GraphError, match="exactly 2 blocks"):
        stamp_layers(trace(three, {"input_ids": torch.zeros(1, 8, dtype=torch.long)}), "model.layers", 10)


def test_plan_of_a_405b_config_reads_no_weights(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_405B))
    t0 = time.perf_counter()
    p = shear.plan(cfg, group_ratio=0.2, round_to=1, world_size=64, seq_len=4096)  # 20% of every group
    assert time.perf_counter() - t0 < 15
    assert p.num_blocks == 126 and p.stamped
    assert p.params_before == 405_853_388_800  # LLaMA-3.1-405B's published count
    fam = {f.name: f for f in p.families}
    assert fam["model.layers.*.mlp/channel"].count == 126 and fam["model.layers.*.mlp/channel"].removed == 10650
    assert fam["model.layers.*.self_attn/head"].removed == 2  # 2 of 8 kv-head families
    assert fam["model/residual"].removed == round(0.2 * 16384)
    assert p.config_after["intermediate_size"] == 53248 - 10650
    assert p.config_after["num_key_value_heads"] == 6 and p.config_after["num_attention_heads"] == 96
    assert 0 < p.params_after < p.params_before
    text = p.format()
    assert "predicted memory" in text and "exact count" in text and "e*P/W" in text
    assert p.lhspg[0].bytes == 2 * p.params_before // 64
    assert f"group ratio 0.2 (share of every {'/'.join(GROUP_KINDS)} group" in text
    assert f"-{1 - p.params_after / p.params_before:.1%} of the parameters: the ratio" in text


def test_plan_ratio_is_the_share_of_parameters(tmp_path: Path) -> None:
    """``--ratio 0.2`` removes 20% of the parameters (MLP channels, as ``shear prune``), not 20% of
    every group (which removes about 36% of the 405B shape); the text states both shares."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_405B))
    p = shear.plan(cfg, 0.2, target=None)
    assert p.ratio == 0.2 and p.group_ratio is None and p.kinds == ("channel",)
    assert abs(1 - p.params_after / p.params_before - 0.2) <= 0.005
    fam = {f.name: f for f in p.families}
    assert fam["model/residual"].removed == 0 and fam["model.layers.*.self_attn/head"].removed == 0
    mlp = fam["model.layers.*.mlp/channel"]
    text = p.format()
    assert "ratio 0.2 (share of the parameters, from the channel groups, as shear prune --ratio 0.2)" in text
    assert f"{p.structures_removed / (mlp.count * mlp.size):.1%} of the channel structures: the group ratio" in text
    old = shear.plan(cfg, group_ratio=0.2, round_to=1)
    assert 1 - old.params_after / old.params_before > 0.3  # the other meaning, now asked for by name
    with pytest.raises(PipelineError, match="not both"):
        shear.plan(cfg, 0.2, group_ratio=0.2)
    with pytest.raises(PipelineError, match="unknown group kinds"):
        shear.plan(cfg, 0.2, kinds=("mlp",))


def test_plan_cli_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model("llama")
    model.save_pretrained(tmp_path / "m")
    assert main(["plan", str(tmp_path / "m"), "--ratio", "0.25", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.mlp/channel" in out and "predicted memory" in out and "measured:" in out
    assert main(["plan", str(tmp_path / "m"), "--ratio", "1.5"]) == 1


def _stream_and_compare(tmp_path: Path, model: torch.nn.Module, ratio: float, shard: str) -> Path:
    import transformers as tf

    model.save_pretrained(tmp_path / "src", max_shard_size=shard)
    before = _digests(tmp_path / "src")
    report = shear.prune_streamed(tmp_path / "src", tmp_path / "out", group_ratio=ratio, round_to=1)
    assert _digests(tmp_path / "src") == before  # the source is never written
    x = {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))}
    small = shear.compile(model, f"magnitude{{ratio={ratio},round_to=1}},erase", example_inputs=x)
    loaded = shear.load(tmp_path / "out")
    want, got = small.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].shape == got[k].shape, k
        assert torch.allclose(want[k], got[k], rtol=0, atol=1e-6), k
    with torch.no_grad():
        ref = small(**x).logits
        assert (loaded(**x).logits - ref).abs().max() <= 1e-5
        if report.from_pretrained_compatible:
            plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
            assert (plain(**x).logits - ref).abs().max() <= 1e-5
    assert report.params_after == sum(p.numel() for p in small.parameters())
    assert [s.name for s in report.stages] == ["plan (meta)", "saliency (magnitude)", "erase + write"]
    return tmp_path / "out"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_streamed_prune_equals_compile_magnitude_erase(tmp_path: Path, arch: str) -> None:
    out = _stream_and_compare(tmp_path, _model(arch), 0.25, "60KB")
    names = sorted(f.name for f in out.iterdir())
    assert "model.safetensors.index.json" in names and "shear.json" in names
    assert sum(n.endswith(".safetensors") and n.startswith("model-") for n in names) > 3


def test_streamed_prune_of_a_tied_single_file_model(tmp_path: Path) -> None:
    _stream_and_compare(tmp_path, _model("llama", layers=3, tied=True), 0.3, "50GB")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_streamed_per_layer_folder_never_masquerades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the config cannot say the pruned sizes, the streamed folder's config.json makes stock
    transformers refuse it naming shear.load (never a size mismatch); the real config is where
    shear.load reads it (``config_file``)."""
    import transformers as tf

    import shear.codegen.hf_config as hf_config

    _model("llama").save_pretrained(tmp_path / "src", max_shard_size="60KB")
    monkeypatch.setattr(hf_config, "refresh_config", lambda model: False)  # as for per-layer widths
    report = shear.prune_streamed(tmp_path / "src", tmp_path / "out", group_ratio=0.25, round_to=1)
    assert not report.from_pretrained_compatible
    with pytest.raises(ValueError, match=r"shear\.load"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(Exception, match=r"shear\.load"):
        tf.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "shear.json").read_text())
    assert (manifest["target"], manifest["config_file"]) == ("shear", "shear_config.json")
    assert json.loads((tmp_path / "out" / "shear_config.json").read_text())["model_type"] == "llama"


def test_stream_prune_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model("llama").save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert main(["stream-prune", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--ratio", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "saliency (magnitude)" in out and "peak RSS MB" in out and "of the parameters" in out
    assert main(["stream-prune", str(tmp_path / "src"), "-o", str(tmp_path / "out")]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    _model("llama").save_pretrained(tmp_path / "src", max_shard_size="60KB")
    return tmp_path / "src"


def test_missing_shard_names_the_file(sharded: Path, tmp_path: Path) -> None:
    (sharded / "model-00002-of-00011.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00011.safetensors is missing.*download"):
        shear.prune_streamed(sharded, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard_names_the_file(sharded: Path, tmp_path: Path) -> None:
    f = sharded / "model-00003-of-00011.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00011.safetensors is truncated.*bytes, its header says"):
        shear.prune_streamed(sharded, tmp_path / "out")


def test_corrupt_header_names_the_file(sharded: Path, tmp_path: Path) -> None:
    f = sharded / "model-00001-of-00011.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00011.safetensors is corrupt"):
        ShardedCheckpoint.open(sharded)


def test_hash_mismatch_against_the_manifest(tmp_path: Path) -> None:
    shear.save(_model("llama"), tmp_path / "saved")
    f = tmp_path / "saved" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes
    f.write_bytes(bytes(data))
    ShardedCheckpoint.open(tmp_path / "saved")  # sizes agree: only the hash can tell
    with pytest.raises(CheckpointError, match=r"model.safetensors fails its sha256 check"):
        shear.prune_streamed(tmp_path / "saved", tmp_path / "out", integrity=True)


def test_output_is_never_the_source_or_inside_it(sharded: Path) -> None:
    before = _digests(sharded)
    with pytest.raises(OutputError, match="is the input"):
        shear.prune_streamed(sharded, sharded, overwrite=True)
    with pytest.raises(OutputError, match="inside the input"):
        shear.prune_streamed(sharded, sharded / "pruned")
    assert _digests(sharded) == before and not (sharded / "pruned").exists()


def test_unknown_criterion_is_refused(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not stream"):
        shear.prune_streamed(sharded, tmp_path / "out", criterion="activation")


def test_writer_streams_a_standard_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    p = tmp_path / "x.safetensors"
    a, b = torch.randn(3, 5), torch.randn(4).to(torch.bfloat16)
    with SafetensorsWriter(p, [("a", torch.float32, (3, 5)), ("b", torch.bfloat16, (4,))]) as w:
        w.write("a", a)
        w.write("b", b)
    got = load_file(str(p))
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    with pytest.raises(CheckpointError, match="expected a"):
        with SafetensorsWriter(tmp_path / "y.safetensors", [("a", torch.float32, (3, 5))]) as w:
            w.write("b", a)


def test_bench_tool_writes_a_random_checkpoint_tensor_by_tensor(tmp_path: Path) -> None:
    from tools import bench_streaming as tool

    config = {**tool.LLAMA2_7B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": VOCAB}
    tool.write_random_checkpoint(tmp_path / "src", config, shard_bytes=40_000)
    ckpt = ShardedCheckpoint.open(tmp_path / "src")
    assert ckpt.sharded and len(ckpt.files) > 2
    assert next(iter(ckpt.tensors.values())).dtype == torch.bfloat16
    report = shear.prune_streamed(tmp_path / "src", tmp_path / "out", group_ratio=0.25, round_to=1)
    assert shear.load(tmp_path / "out").model.layers[0].mlp.up_proj.weight.shape == (72, 48)
    assert report.params_after < report.params_before
