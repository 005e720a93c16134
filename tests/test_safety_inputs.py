"""Bad inputs become ShearErrors before any work, and what a config may ask for is bounded first.

Each test builds its bad input from scratch (a crafted knowledge-distribution cache, a config that
claims 10**8 layers, a seed past 64 bits, a pipeline file in Latin-1, an empty example input, a
NaN weight before an export) and checks that shear either refuses it with a :class:`ShearError`
naming the input and the fix, or (a cache, which is only an optimisation) ignores it with a
warning naming the file and measures again, giving what a fresh measurement gives.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import shear
from shear.cli import main
from shear.data import TextData
from shear.errors import ExportError, InputError, ModelLoadError, PipelineError
from shear.passes import Context, PassManager
from shear.passes.lorashear.knowledge import KnowledgeDistribution
from shear.passes.lorashear.knowledge_cache import MAX_BYTES
from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_llama()


def _cli_fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the CLI on ``args``; it must exit 1 with a message, never a traceback. Returns stderr."""
    assert main(list(args)) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.startswith(f"shear {args[0]}: error: "), err
    return err


# -- the knowledge-distribution cache -------------------------------------------------------------

KD = "knowledge-distribution{{proxy=random,seq_len=16,max_windows=1,cache_dir=\"{}\"}}"


def _kd_run(model: torch.nn.Module, data: TextData, cache: Path) -> Context:
    ctx = Context(model=model, example_inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long)}, data=data)
    PassManager(["discover-groups", KD.format(cache)]).run(ctx)
    return ctx


def _bigram_text() -> TextData:
    ids = torch.randint(0, 2048, (600,), generator=torch.Generator().manual_seed(0))
    return TextData(None, {"a": ids[:400]}, {"a": ids[400:]})


def _crafted(doc: dict[str, Any], how: str) -> str:
    """The stored result ``doc`` spoiled one way, as the JSON text a crafted file would hold."""
    doc = copy.deepcopy(doc)
    if how == "no entries":
        doc["entries"] = []
    elif how == "missing group":  # consistent in itself: only the graph check can tell
        gone = doc["entries"].pop()["node_group"]
        doc["ranking"] = [r for r in doc["ranking"] if r != gone]
        doc["unprunable_node_groups"] = [r for r in doc["unprunable_node_groups"] if r != gone]
    elif how == "wrong group id":
        doc["entries"][0]["pruning_groups"] = [9999]
    elif how == "wrong node group id":
        old = doc["entries"][0]["node_group"]
        doc["entries"][0]["node_group"] = 7777
        doc["ranking"] = [7777 if r == old else r for r in doc["ranking"]]
        doc["unprunable_node_groups"] = [7777 if r == old else r for r in doc["unprunable_node_groups"]]
    elif how == "number past float range":
        doc["base_ppl"] = 10**400  # a JSON integer float() overflows on
    elif how == "NaN deviation":
        doc["entries"][0]["deviation"] = float("nan")
    elif how == "string structures":
        doc["entries"][0]["structures"] = "4"
    elif how == "bool id":
        doc["ranking"][0] = True
    elif how == "unknown field":
        doc["entries"][0]["module_attrs"] = {"eps": 1000}
    elif how == "deep nesting":
        return "[" * 200_000 + "]" * 200_000
    elif how == "not JSON":
        return "{not json"
    return json.dumps(doc)


SPOILED = (
    "no entries", "missing group", "wrong group id", "wrong node group id", "number past float range", "NaN deviation",
    "string structures", "bool id", "unknown field", "deep nesting", "not JSON",
)


def test_a_spoiled_knowledge_cache_is_ignored_with_a_warning_and_measured_again(tiny: Any, tmp_path: Path) -> None:
    """Destructive 6: a crafted cache never decides which MLPs are protected. Each spoiled file is
    ignored with a warning that names it and why; the result equals a fresh measurement, and the file
    is replaced by the good one."""
    data = _bigram_text()
    fresh_ctx = _kd_run(tiny.model, data, tmp_path)
    fresh = fresh_ctx.get(KnowledgeDistribution)
    (cached,) = tmp_path.glob("knowledge-*.json")
    good = json.loads(cached.read_text())
    assert len(good["entries"]) == 4 and not fresh_ctx.warnings
    for how in SPOILED:
        cached.write_text(_crafted(good, how))
        ctx = _kd_run(tiny.model, data, tmp_path)
        warned = [w for w in ctx.warnings if "knowledge-distribution" in w]
        assert len(warned) == 1, (how, ctx.warnings)
        assert str(cached) in warned[0] and "not usable" in warned[0] and "measures again" in warned[0], warned
        assert ctx.get(KnowledgeDistribution) == fresh, how
        assert json.loads(cached.read_text()) == good, how
    cached.write_bytes(b"\xff\xfe not utf-8")
    ctx = _kd_run(tiny.model, data, tmp_path)
    assert any(str(cached) in w for w in ctx.warnings) and ctx.get(KnowledgeDistribution) == fresh
    with cached.open("r+b") as f:  # sparse: past MAX_BYTES without writing it
        f.truncate(MAX_BYTES + 1)
    ctx = _kd_run(tiny.model, data, tmp_path)
    assert [w for w in ctx.warnings if f"{cached} is not usable (larger than 64 MiB)" in w], ctx.warnings
    assert ctx.get(KnowledgeDistribution) == fresh and json.loads(cached.read_text()) == good
    reloaded = _kd_run(tiny.model, data, tmp_path)  # the good file is used again, silently
    assert not reloaded.warnings and reloaded.get(KnowledgeDistribution) == fresh


def test_an_unwritable_cache_dir_warns_and_keeps_the_result(tiny: Any, tmp_path: Path) -> None:
    """The cache is an optimisation: a cache_dir that is a file warns after the measurement, never fails the run."""
    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    ctx = _kd_run(tiny.model, _bigram_text(), blocker)
    warned = [w for w in ctx.warnings if "knowledge-distribution: could not keep the result in" in w]
    assert len(warned) == 1 and str(blocker) in warned[0] and warned[0].endswith("; check cache_dir"), ctx.warnings
    assert ctx.get(KnowledgeDistribution).entries and blocker.read_text() == "mine"


# -- bounds before work: a config that claims too much ---------------------------------------------


def _config(tmp_path: Path, **changes: Any) -> Path:
    cfg = json.loads((TINY_LLAMA_DIR / "config.json").read_text())
    cfg.update(changes)
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 10**8}, r"num_hidden_layers = 100000000 .*at most 4,096; with it the config asks for about 1.97e\+13 parameters"),
        ({"hidden_size": 10**7}, r"hidden_size = 10000000 is not a size"),
        ({"vocab_size": "many"}, r"vocab_size = 'many' is not a size"),
        ({"num_hidden_layers": 4000, "hidden_size": 65536, "intermediate_size": 1 << 20, "num_attention_heads": 512},
         r"asks for about 8.3\de\+14 parameters .*fix the sizes"),
        ({"num_hidden_layers": 10**400}, r"num_hidden_layers = 1000000000\d+\.\.\. is not a size .*about 1e\+405 parameters\)"),
        ({"moe_intermediate_size": 1 << 30}, r"moe_intermediate_size = 1073741824 is not a size .*at most 4,194,304"),
        ({"num_hidden_layers": 2048, "num_local_experts": 1024},
         r"2,048 layers x 1,024 experts is more modules than a skeleton can hold \(at most 1,048,576\); fix the config"),
    ],
)
def test_plan_refuses_a_config_that_claims_too_much_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], message: str
) -> None:
    """Destructive 7: `shear plan` on a config claiming 10**8 layers hung; now it is refused in well
    under a second, as a directory and as a bare config file, with the estimate in the message."""
    folder = _config(tmp_path, **changes)
    for target in (folder, folder / "config.json"):
        start = time.perf_counter()
        with pytest.raises(InputError, match=message):
            shear.plan(target)
        assert time.perf_counter() - start < 5
        err = _cli_fails(capsys, "plan", str(target))
        assert "config.json" in err and "fix" in err


def test_plan_names_the_field_as_the_config_spells_it(tmp_path: Path) -> None:
    """A GPT-2 config says n_layer: only the check of the transformers config (in open_source) sees it."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    gpt2 = {"model_type": "gpt2", "n_layer": 10**8, "n_embd": 64, "n_head": 2, "vocab_size": 100, "bos_token_id": 0, "eos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(InputError, match=r"config.json: n_layer = 100000000 is not a size shear can plan \(a positive integer at most 4,096; with it"):
        shear.plan(folder)


def test_plan_refuses_a_config_nested_too_deep(tmp_path: Path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ModelLoadError, match="nested too deep"):
        shear.plan(bad)


# -- options: a seed past 64 bits, unknown kinds, a size given as text ------------------------------


def test_random_seed_ratio_and_kinds_are_checked_before_work() -> None:
    from shear.passes import parse_pipeline
    from shear.passes.baselines.random import Random

    with pytest.raises(PipelineError, match=r"random: seed must be in \[0, 18,446,744,073,709,551,615\]"):
        parse_pipeline("random{seed=100000000000000000000000}")
    with pytest.raises(PipelineError, match=r"random: seed must be in"):
        Random(seed=10**23)
    with pytest.raises(PipelineError, match=r"unknown group kinds \['bogus'\]; use some of channel, head, residual"):
        parse_pipeline("random{kinds=[bogus]}")
    with pytest.raises(PipelineError, match=r"kinds \[\] is empty"):
        Random(kinds=())
    with pytest.raises(PipelineError, match=r"option 'ratio' is the text '0.2', expected float; give it as one \(ratio=0.2\)"):
        Random(ratio="0.2")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"option 'ratio' expects float, got 'abc' \(str\); give ratio=<float>$"):
        Random(ratio="abc")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"option 'kinds' is the text 'channel', expected tuple\[str, ...\]; give it as one \(kinds=\('channel',\)\)"):
        Random(kinds="channel")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"random: ratio must be in \[0, 1\)"):
        Random(ratio=float("nan"))
    assert parse_pipeline("random{kinds=[channel,head],seed=7}") == [Random(kinds=("channel", "head"), seed=7)]


def test_a_size_given_as_text_is_refused_by_plan_and_prune_streamed(tmp_path: Path) -> None:
    folder = _config(tmp_path)
    with pytest.raises(PipelineError, match=r"plan: ratio must be in \(0, 1\) \(a number\), got '0.2' \(str\); give it as a number"):
        shear.plan(folder, ratio="0.2")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"plan: ratio must be in \(0, 1\) \(a number\), got 'abc' \(str\); give it as a number$"):
        shear.plan(folder, ratio="abc")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"plan: seq_len must be in \[1, "):
        shear.plan(folder, seq_len=0)
    out = tmp_path / "out"
    with pytest.raises(PipelineError, match=r"stream-prune: ratio must be in \(0, 1\) \(a number\), got '0.2'"):
        shear.prune_streamed(TINY_LLAMA_DIR, out, ratio="0.2")  # type: ignore[arg-type]
    assert not out.exists()


def test_a_pass_built_in_python_with_an_option_as_text_is_refused() -> None:
    """Every pass checks its options against their annotations when built, before its own __post_init__
    (which would otherwise compare text with a number and fail with a raw TypeError)."""
    from shear.passes.base import Pass
    from shear.passes.baselines.magnitude import Magnitude
    from shear.passes.baselines.taylor import Taylor

    with pytest.raises(PipelineError, match=r"pass 'magnitude': option 'round_to' is the text '8', expected int; give it as one \(round_to=8\)"):
        Magnitude(round_to="8")  # type: ignore[arg-type]

    @dataclass(frozen=True)
    class Plain(Pass):  # a user's pass: no __post_init__ of its own, not registered
        name: ClassVar[str] = "plain-example"
        steps: int = 1

    with pytest.raises(PipelineError, match=r"pass 'plain-example': option 'steps' is the text '3'"):
        Plain(steps="3")  # type: ignore[arg-type]
    assert Plain(steps=3).steps == 3
    with pytest.raises(PipelineError, match=r"pass 'taylor': option 'ratio' is the text '0.2', expected float; give it as one \(ratio=0.2\)"):
        Taylor(ratio="0.2")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match=r"taylor: ratio must be in \[0, 1\)"):
        Taylor(ratio=1.5)


def test_taylor_and_lhspg_refuse_an_unknown_group_kind() -> None:
    from shear.passes import parse_pipeline
    from shear.passes.lorashear.lhspg import eligible_groups

    with pytest.raises(PipelineError, match=r"taylor: kinds must be some of \['channel', 'head', 'residual'.*\], got \['bogus'\]"):
        parse_pipeline("taylor{kinds=[bogus]}")
    with pytest.raises(PipelineError, match=r"lhspg: unknown group kinds \['bogus'\]; use channel, head, residual"):
        eligible_groups(None, None, ("bogus",), capped=False)  # type: ignore[arg-type]


def test_erase_verify_that_is_not_a_bool_is_blamed_on_the_option() -> None:
    from shear.passes import parse_pipeline
    from shear.passes.core.erase import Erase

    for bad in ("nan", "-1"):
        with pytest.raises(PipelineError, match=rf"option 'verify' expects bool, got '{bad}'.*give verify=true or verify=false"):
            parse_pipeline(f"erase{{verify={bad}}}")
    with pytest.raises(PipelineError, match=r"option 'verify' expects bool, got nan"):
        Erase(verify=float("nan"))  # type: ignore[arg-type]


def test_compile_verify_tolerance_must_be_a_finite_number(tiny: Any) -> None:
    for bad in (float("nan"), -1, "1e-4"):
        with pytest.raises(InputError, match=r"shear.compile: verify=.* is not a tolerance; give verify=True"):
            shear.compile(tiny.model, "random{ratio=0.3},erase", verify=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("shape", "which"), [((0, 16), "batch 0"), ((1, 0), "sequence length 0")])
def test_compile_refuses_empty_example_inputs(tiny: Any, shape: tuple[int, int], which: str) -> None:
    with pytest.raises(InputError, match=rf"example input 'input_ids' has shape \({shape[0]}, {shape[1]}\) \({which}\)"):
        shear.compile(tiny.model, "random{ratio=0.3},erase", example_inputs={"input_ids": torch.zeros(shape, dtype=torch.long)})


# -- files and the command line --------------------------------------------------------------------


def test_pipeline_files_txt_non_utf8_and_unknown_suffix(tmp_path: Path) -> None:
    from shear.passes import resolve_pipeline

    txt = tmp_path / "steps.txt"
    txt.write_text("random{ratio=0.3,seed=0},erase\n")
    assert [p.name for p in resolve_pipeline(str(txt))] == ["random", "erase"]  # was "unknown pass '.../steps.txt'"
    latin = tmp_path / "steps.toml"
    latin.write_bytes('[[passes]]\nname = "random"\n# r\xe9glage\n'.encode("latin-1"))
    with pytest.raises(PipelineError, match=r"steps.toml' is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"):
        resolve_pipeline(str(latin))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe random")
    with pytest.raises(PipelineError, match=r"bad.txt' is not UTF-8 text"):
        resolve_pipeline(str(tmp_path / "bad.txt"))
    cfg = tmp_path / "steps.cfg"
    cfg.write_text("erase")
    with pytest.raises(PipelineError, match=r"has the suffix '.cfg'; shear reads .toml, .yaml/.yml .* and .txt"):
        resolve_pipeline(str(cfg))
    table = tmp_path / "table.txt"
    table.write_text('[[passes]]\nname = "random"\n')
    with pytest.raises(PipelineError, match=r"(?s)table.txt': bad pipeline string.*a table of passes goes in a .toml file"):
        resolve_pipeline(str(table))


@pytest.mark.parametrize(("command", "seq_len"), [("inspect", "0"), ("inspect", "-5"), ("draw", "65537"), ("prune", "100000")])
def test_inspect_draw_prune_refuse_a_seq_len_out_of_range(command: str, seq_len: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [command, str(TINY_LLAMA_DIR), "--seq-len", seq_len] + (["-o", "unused"] if command != "inspect" else [])
    err = _cli_fails(capsys, *args)
    assert f"shear {command}: error: --seq-len {seq_len}: a sequence needs 1 to 65,536 tokens; give a length in that range" in err


def test_plan_leaves_its_seq_len_to_shear_plan(capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_fails(capsys, "plan", str(TINY_LLAMA_DIR), "--seq-len", "0")
    assert "shear plan: error: plan: seq_len must be in [1, 16,777,216] (an integer), got 0" in err


def test_export_refuses_a_malformed_pre_tokenizer_and_non_finite_weights(
    tiny: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shear.io.gguf_vocab import check_pre, read_vocab

    out = tmp_path / "m.gguf"
    err = _cli_fails(capsys, "export", str(TINY_LLAMA_DIR), "-o", str(out), "--pre", "anything\nat all")
    assert "pre='anything\\nat all' is not a llama.cpp pre-tokenizer name; such a name is 1 to 64 lowercase" in err
    assert not out.exists()
    with pytest.raises(ExportError, match=r"pre='xxxx.*\.\.\. is not a llama.cpp pre-tokenizer name.*give the one llama.cpp uses"):
        shear.export(tiny.model, out, tokenizer=TINY_LLAMA_DIR, pre="x" * 500)
    with pytest.raises(ExportError, match=r"pre='gpt-2\\n' is not a llama.cpp pre-tokenizer name"):
        read_vocab(TINY_LLAMA_DIR, 2048, pre="gpt-2\n")  # the check sits where pre is used
    assert check_pre("a.x-4.0") == "a.x-4.0" and check_pre("some-bpe-llama.cpp-adds-next-year") is not None
    assert read_vocab(TINY_LLAMA_DIR, 2048, pre="newer-bpe").pre == "newer-bpe"
    broken = copy.deepcopy(tiny.model)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        broken.model.layers[2].self_attn.o_proj.weight[0, 0] = math.inf
    with pytest.raises(ExportError, match=r"2 tensors hold NaN or Inf as written in f16 \(e.g. blk.1.ffn_up.weight, blk.2.attn_output.weight\).*allow_nonfinite=True"):
        shear.export(broken, out, tokenizer=TINY_LLAMA_DIR)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with torch.no_grad():
        big = copy.deepcopy(tiny.model)
        big.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6  # finite in fp32, Inf in f16
    with pytest.raises(ExportError, match=r"blk.0.ffn_down.weight.*try dtype='bf16'"):
        shear.export(big, out, tokenizer=TINY_LLAMA_DIR)
    assert shear.export(broken, out, tokenizer=TINY_LLAMA_DIR, allow_nonfinite=True) == out and out.is_file()



@pytest.mark.parametrize("ratio", ["abc", "0.2", None, True])
def test_a_sparsity_ratio_that_is_not_a_number_is_refused(ratio: object) -> None:
    from shear.errors import KernelError
    from shear.kernels.sparsity import check_ratio
    from shear.passes.baselines.magnitude import Magnitude

    with pytest.raises(PipelineError, match=r"pass 'magnitude': option 'ratio'"):
        Magnitude(ratio=ratio)  # type: ignore[arg-type]
    with pytest.raises(KernelError, match=r"wanda: ratio must be in \(0, 1\), got .*; give it as a number"):
        check_ratio("wanda", ratio)  # type: ignore[arg-type]
