"""Bad inputs and faults as a new user meets them: no user file is lost, no loaded file runs code,
no stale checkpoint is resumed into another run, and every bad input ends in a ShearError that says
what to fix, with the input untouched."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import shear
import shear.io.outputs as files
from shear.cli import main
from shear.data import TextData
from shear.errors import CheckpointError, DataError, InputError, OutputError, PipelineError, ShearError
from shear.training import TokenBatches, TrainConfig, TrainHook, ensure_lora, train
from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama

PRUNE = "random{ratio=0.3,seed=0},erase"


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_llama()


@pytest.fixture(scope="module")
def small(tiny: Any) -> nn.Module:
    return shear.compile(tiny.model, PRUNE)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return _tree(path)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _rehash(path: Path, name: str) -> None:
    """Record ``path/name``'s current size and sha256 in the manifest, as a deliberate forger would."""
    mf = path / "shear.json"
    data = json.loads(mf.read_text())
    data["files"][name] = {"size": (path / name).stat().st_size, "sha256": files.sha256_file(path / name)}
    mf.write_text(json.dumps(data))


class _Marker:
    """Unpickling it writes a marker file: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def no_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pruning work fails the test: output checks must come first."""

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("pruning started before the output path was checked")

    monkeypatch.setattr(shear, "compile", boom)


# --- 1. output paths ------------------------------------------------------------------------------

def test_prune_refuses_a_folder_with_user_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None) -> None:
    out = tmp_path / "out"
    before = _user_folder(out)
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds 2 files (notes.txt, sub)" in err and "--overwrite" in err
    assert _tree(out) == before and _hidden(tmp_path) == []


def test_prune_overwrite_replaces_atomically_and_leaves_nothing_hidden(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _user_folder(out)
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", "none", "-o", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "shear.json").is_file()
    assert _hidden(tmp_path) == []
    # the output is usable on its own: the tokenizer came along, and everything in it is hashed
    from transformers import AutoTokenizer

    assert (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]
    assert shear.load(out).config.vocab_size == 2048


@pytest.mark.parametrize("overwrite", [False, True])
def test_prune_refuses_the_input_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: bool, no_pruning: None) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TINY_LLAMA_DIR, model)
    before = _tree(model)
    args = ["prune", str(model), "--passes", PRUNE, "-o", str(model)] + (["--overwrite"] if overwrite else [])
    assert main(args) == 1
    assert "is the input" in capsys.readouterr().err
    assert main(["prune", str(model), "--passes", PRUNE, "-o", str(tmp_path), "--overwrite"]) == 1
    assert "contains the input" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    (data / "web.txt").write_text("my text")
    assert main(["prune", str(model), "--passes", PRUNE, "--data", str(data), "-o", str(data), "--overwrite"]) == 1
    assert "is the input" in capsys.readouterr().err and (data / "web.txt").read_text() == "my text"
    assert _tree(model) == before and _hidden(tmp_path) == []


def test_prune_refuses_a_file_and_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_pruning: None
) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    for extra in ([], ["--overwrite"]):
        assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(target), *extra]) == 1
        assert "is an existing file" in capsys.readouterr().err
    assert target.read_bytes() == b"precious" and _hidden(tmp_path) == []
    monkeypatch.chdir(tmp_path)
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", ".", "--overwrite"]) == 1
    assert "is the current directory" in capsys.readouterr().err


def test_prune_refuses_read_only_and_unwritable_paths_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_pruning: None
) -> None:
    out = tmp_path / "ro"
    before = _user_folder(out)
    out.chmod(0o555)
    try:
        assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(out), "--overwrite"]) == 1
        assert "is read-only" in capsys.readouterr().err
        assert _tree(out) == before
    finally:
        out.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(locked / "new")]) == 1
    assert "no write permission in" in capsys.readouterr().err
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: SimpleNamespace(free=10))
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(tmp_path / "new")]) == 1
    assert "not enough space" in capsys.readouterr().err


def test_draw_refuses_to_replace_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "groups.dot"
    target.write_text("mine")
    assert main(["draw", str(TINY_LLAMA_DIR), "-o", str(target)]) == 1
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err and target.read_text() == "mine"


def test_save_refuses_a_non_empty_path_unless_overwrite(small: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "m"
    before = _user_folder(out)
    with pytest.raises(OutputError, match=r"holds 2 files .*pass overwrite=True"):
        shear.save(small, out)
    assert _tree(out) == before
    shear.save(small, out, overwrite=True)
    assert not (out / "notes.txt").exists() and _hidden(tmp_path) == []
    with pytest.raises(OutputError, match="an existing file"):
        shear.save(small, out / "model.safetensors", overwrite=True)


def test_save_swap_leaves_old_or_new_never_neither(small: nn.Module, tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m"
    shear.save(tiny.model, out)
    # a kill right after the swap: the new model is in place (the old one is in our temporary)
    monkeypatch.setattr(files, "_remove_tree", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        shear.save(small, out, overwrite=True)
    monkeypatch.undo()
    assert shear.load(out).model.layers[0].mlp.up_proj.out_features < tiny.model.config.intermediate_size
    # where the OS has no atomic exchange, a kill between the two renames is named by load
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real = os.replace
    calls: list[str] = []

    def killed_second(a: Any, b: Any) -> None:
        calls.append(str(b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(files.os, "replace", killed_second)
    with pytest.raises(KeyboardInterrupt):
        shear.save(tiny.model, out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"a save into it was interrupted; the previous model is in .*\.m\.old-"):
        shear.load(out)


# --- 2. loading is data, never code ---------------------------------------------------------------

def _graph_checkpoint(tmp_path: Path) -> Path:
    from test_graph_codegen import _tiny_gpt

    model, ids = _tiny_gpt()
    gm = shear.compile(model, "discover-groups,random{ratio=0.5,seed=0},erase", example_inputs=ids)
    assert isinstance(gm, torch.fx.GraphModule)
    return shear.save(gm, tmp_path / "gm")


def _rewrite_zip(file: Path, edit: Any) -> None:
    with zipfile.ZipFile(file) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    edit(entries)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)


def test_program_with_a_use_pickle_weight_does_not_run(tmp_path: Path) -> None:
    out = _graph_checkpoint(tmp_path)
    marker = tmp_path / "ran"

    def poison(entries: dict[str, bytes]) -> None:
        name = next(n for n in entries if n.endswith("model_weights_config.json"))
        config = json.loads(entries[name])
        first = next(iter(config["config"]))
        config["config"][first]["use_pickle"] = True
        entries[name] = json.dumps(config).encode()
        weights_dir = name.rsplit("/", 1)[0]
        buf = io.BytesIO()
        torch.save(_Marker(marker), buf)
        entries[f"{weights_dir}/{config['config'][first]['path_name']}"] = buf.getvalue()

    _rewrite_zip(out / "program.pt2", poison)
    _rehash(out, "program.pt2")  # hashes live in the same folder: they prove nothing against a forger
    with pytest.raises(CheckpointError, match="use_pickle.*would run code"):
        shear.load(out)
    assert not marker.exists()


def test_program_whose_inputs_need_unpickling_does_not_run(tmp_path: Path) -> None:
    out = _graph_checkpoint(tmp_path)
    marker = tmp_path / "ran"

    def poison(entries: dict[str, bytes]) -> None:
        name = next(n for n in entries if "/data/sample_inputs/" in n)
        entries[name] = pickle.dumps(_Marker(marker))

    _rewrite_zip(out / "program.pt2", poison)
    _rehash(out, "program.pt2")
    with pytest.raises(CheckpointError, match="asks to unpickle"):
        shear.load(out)
    assert not marker.exists()


def _custom_class_checkpoint(tmp_path: Path, tiny: Any, module: str) -> Path:
    out = shear.save(tiny.model, tmp_path / "m")
    mf = out / "shear.json"
    data = json.loads(mf.read_text())
    data["class"], data["class_module"] = "EvilForCausalLM", module
    mf.write_text(json.dumps(data))
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    _rehash(out, "config.json")
    return out


def test_a_module_named_in_the_checkpoint_is_never_imported(
    tmp_path: Path, tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "ran"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass EvilForCausalLM: pass\n"
    out = _custom_class_checkpoint(tmp_path, tiny, "evil_mod")
    monkeypatch.chdir(out)
    monkeypatch.syspath_prepend(str(out))
    (out / "evil_mod.py").write_text(payload)  # shipped inside the folder, cwd on sys.path
    with pytest.raises(CheckpointError, match=r"not in shear.json's file list"):
        shear.load(out)
    _rehash(out, "evil_mod.py")
    with pytest.raises(CheckpointError, match=r"evil_mod.py is not a data file"):
        shear.load(out)
    (out / "evil_mod.py").unlink()
    data = json.loads((out / "shear.json").read_text())
    del data["files"]["evil_mod.py"]
    (out / "shear.json").write_text(json.dumps(data))
    (tmp_path / "evil_mod.py").write_text(payload)  # or next to it, importable
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"never imports a module named in a checkpoint.*classes=\[EvilForCausalLM\]"):
        shear.load(out)
    assert not marker.exists()


def test_classes_the_caller_passes_are_allowed(tmp_path: Path, tiny: Any) -> None:
    from transformers import LlamaForCausalLM

    class EvilForCausalLM(LlamaForCausalLM):  # a caller's own transformers-style class
        pass

    out = _custom_class_checkpoint(tmp_path, tiny, "somewhere")
    again = shear.load(out, classes=[EvilForCausalLM])
    assert type(again) is EvilForCausalLM


# --- 3. resume only the same run ------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tiny: Any) -> TextData:
    return TextData.from_corpus(tiny.tokenizer, max_train_chars=20_000, max_val_chars=5_000)


def _lhspg(model: nn.Module, data: TextData, ckpt_dir: Path, ratio: float) -> nn.Module:
    opts = "periods=1,steps_per_period=2,warmup=0,batch_size=1,seq_len=32,calibration=2,checkpoint_every=1"
    return shear.compile(
        model, f'lora,discover-groups,lhspg{{ratio={ratio},{opts},checkpoint_dir="{ckpt_dir}"}}', data=data, verify=False,
    )


def test_a_checkpoint_of_another_ratio_or_model_is_not_resumed(tiny: Any, corpus: TextData, tmp_path: Path) -> None:
    first = _lhspg(tiny.model, corpus, tmp_path / "c", 0.2)
    with pytest.raises(ShearError, match=r"belongs to another finished run .*ratio was 0.2, now 0.5.*new checkpoint_dir"):
        _lhspg(tiny.model, corpus, tmp_path / "c", 0.5)
    other = load_tiny_llama().model
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ShearError, match=r"another finished run \(the model's weights differ\)"):
        _lhspg(other, corpus, tmp_path / "c", 0.2)
    again = _lhspg(tiny.model, corpus, tmp_path / "c", 0.2)  # the same run: its result, and it says so
    assert any("already finished at step 2; its result is reused" in w for w in again.shear_report.warnings)
    for (n, a), (_, b) in zip(first.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


class _Kill(TrainHook):
    def __init__(self, at: int) -> None:
        self.at = at

    def after_optimizer_step(self, state: Any) -> None:
        if state.step == self.at:
            raise KeyboardInterrupt


def _train(tmp_path: Path, hooks: list[TrainHook], data_seed: int = 0) -> Any:
    from models import build

    model, _ = build("llama")
    torch.manual_seed(1)
    model, _ = ensure_lora(model, r=2)
    cfg = TrainConfig(steps=2, batch_size=1, seq_len=8, checkpoint_dir=str(tmp_path / "t"), checkpoint_every=1)
    tokens = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(data_seed))
    return train(model, TokenBatches.from_config({"a": tokens}, cfg), cfg, hooks=hooks)


def test_a_resumed_run_says_so_and_other_data_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, [_Kill(2)])  # after step 1's checkpoint, before step 2's
    with pytest.raises(CheckpointError, match=r"another run \(the training data differs\)"):
        _train(tmp_path, [_Kill(-1)], data_seed=1)
    result = _train(tmp_path, [_Kill(-1)])
    assert result.resumed_step == 1 and any("resumed from step 1 of 2" in w for w in result.warnings)


# --- 4. integrity ---------------------------------------------------------------------------------

def _flip(file: Path, at: int = -3) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0x01
    file.write_bytes(bytes(data))


def test_an_empty_file_list_does_not_load(small: nn.Module, tmp_path: Path) -> None:
    out = shear.save(small, tmp_path / "m")
    _flip(out / "model.safetensors")
    data = json.loads((out / "shear.json").read_text())
    data["files"] = {}
    (out / "shear.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"not in shear.json's file list"):
        shear.load(out)
    with pytest.raises(CheckpointError, match=r"not in shear.json's file list"):
        shear.load(out, integrity=False)


def test_every_saved_file_is_hashed(small: nn.Module, tmp_path: Path) -> None:
    out = shear.save(small, tmp_path / "m")
    listed = set(json.loads((out / "shear.json").read_text())["files"])
    assert listed == set(_tree(out)) - {"shear.json"} and "config.json" in listed
    (out / "extra.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"\['extra.json'\] is not in shear.json's file list"):
        shear.load(out)


def test_a_flipped_byte_in_training_state_is_detected(tmp_path: Path) -> None:
    _train(tmp_path, [])
    _flip(tmp_path / "t" / "step-2" / "state.pt", at=200)
    with pytest.raises(CheckpointError, match=r"state.pt fails its sha256 check"):
        _train(tmp_path, [])


# --- 5. one error family at the boundary ----------------------------------------------------------

def test_non_utf8_data_is_a_data_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "web.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    code = main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", str(data), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "web.txt is not UTF-8 text" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_token_ids_and_positions_outside_the_model(tiny: Any) -> None:
    with pytest.raises(InputError, match=r"token id 2050, outside the model's vocabulary of 2048"):
        shear.compile(tiny.model, PRUNE, example_inputs={"input_ids": torch.tensor([[1, 2050]])})
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)).eval()
    with pytest.raises(InputError, match=r"has 12 positions, the model has 8"):
        shear.compile(gpt2, PRUNE, example_inputs={"input_ids": torch.zeros(1, 12, dtype=torch.long)})
    data = TextData(None, {"a": torch.tensor([1, 2, 5000, 3])})
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        shear.compile(tiny.model, PRUNE, data=data)


def test_int_input_to_a_float_model() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(InputError, match=r"example input 0 is torch.int64 but Sequential computes in torch.float32"):
        shear.compile(net, PRUNE, example_inputs=(torch.arange(8).view(2, 4),))


def test_meta_model_into_erase_and_nan_weights(tiny: Any) -> None:
    with torch.device("meta"):
        skeleton = type(tiny.model)(tiny.model.config)
    with pytest.raises(InputError, match="on the meta device .* Load the weights first"):
        shear.compile(skeleton, PRUNE)
    assert shear.compile(skeleton, "discover-groups") is not None  # a skeleton still traces
    broken = load_tiny_llama().model
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[3, 3] = float("nan")
    with pytest.raises(InputError, match=r"NaN or Inf weights in \['model.layers.0.mlp.up_proj.weight'\] before pruning"):
        shear.compile(broken, PRUNE)


@pytest.mark.parametrize("text", [b"bytes of text", None])
def test_text_must_be_a_str(tiny: Any, text: Any) -> None:
    with pytest.raises(DataError, match=r"source 'a': text must be a str"):
        TextData.from_texts(tiny.tokenizer, {"a": text})


def test_a_manifest_without_shapes(small: nn.Module, tmp_path: Path) -> None:
    out = shear.save(small, tmp_path / "m")
    data = json.loads((out / "shear.json").read_text())
    del data["shapes"]
    (out / "shear.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"lacks \['shapes'\]; the manifest is damaged"):
        shear.load(out)


def test_empty_passes_mean_the_same_in_the_api_and_the_cli(tiny: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="the pipeline is empty"):
        shear.compile(tiny.model, "")
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", "", "-o", str(tmp_path / "o")]) == 1
    assert "the pipeline is empty" in capsys.readouterr().err


def test_an_edited_config_is_refused(tiny: Any, tmp_path: Path) -> None:
    pruned = shear.compile(tiny.model, "random{ratio=0.5,seed=0,kinds=[channel]},erase")
    out = shear.save(pruned, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    saved = cfg["intermediate_size"]
    cfg["intermediate_size"] = tiny.model.config.intermediate_size
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json (fails its sha256|has \d+ bytes)"):
        shear.load(out)
    _rehash(out, "config.json")
    with pytest.raises(CheckpointError, match=rf"intermediate_size={tiny.model.config.intermediate_size} but the weights have {saved}"):
        shear.load(out)


def test_compile_checks_its_dump_dir_first(tiny: Any, tmp_path: Path) -> None:
    target = tmp_path / "dumps"
    target.write_text("mine")
    with pytest.raises(OutputError, match="is an existing file; give a directory"):
        shear.compile(tiny.model, PRUNE, dump_dir=target)
    assert target.read_text() == "mine"
