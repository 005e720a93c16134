"""Reading a saved model or a model folder is data, never code: crafted ``program.pt2`` archives,
edited ``shear.json`` manifests and ``trainer.json`` records, folders asking transformers for remote
code, and devices the machine lacks all end in a ShearError naming the input and the fix, and no
payload ever runs (each would write a marker file if it did)."""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

import shear
import shear.io.checkpoint as checkpoint
from shear.cli import main
from shear.errors import CheckpointError, InputError, ModelLoadError, OutputError
from shear.io.manifest_schema import check_module_attrs
from shear.io.outputs import sha256_file
from shear.io.safe_archive import check_program_archive
from shear.training.checkpoints import SHARDED_FORMAT, check_checkpoint_dir, load_checkpoint, save_checkpoint
from shear.training.dcp_checkpoints import check_sharded_checkpoint
from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama

PRUNE = "random{ratio=0.3,seed=0},erase"


class _Marker:
    """Unpickling it writes a marker file: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _shell(marker: Path) -> str:
    """Python source that writes ``marker`` when evaluated."""
    return f"__import__('os').system('touch {marker}')"


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_llama()


@pytest.fixture(scope="module")
def graph_dir(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA erased into a GraphModule and saved (program.pt2 + shear.json): the clean original."""
    gm = shear.compile(tiny.model, "random{ratio=0.3,seed=0},erase{emit=graph,verify=false}")
    assert isinstance(gm, torch.fx.GraphModule)
    return shear.save(gm, tmp_path_factory.mktemp("graph") / "gm")


@pytest.fixture(scope="module")
def model_dir(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pruned tiny LLaMA saved by shear.save (safetensors + config + shear.json): the clean original."""
    return shear.save(shear.compile(tiny.model, PRUNE), tmp_path_factory.mktemp("model") / "m")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def _rehash(path: Path, name: str) -> None:
    """Record ``path/name``'s size and sha256 in the manifest, as a deliberate forger would."""
    mf = path / "shear.json"
    data = json.loads(mf.read_text())
    data["files"][name] = {"size": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    mf.write_text(json.dumps(data))


def _poison(folder: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Rewrite ``folder/program.pt2`` record by record through ``edit`` and rehash it."""
    file = folder / "program.pt2"
    with zipfile.ZipFile(file) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    edit(entries)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    _rehash(folder, "program.pt2")


def _edit_json(entries: dict[str, bytes], name: str, edit: Callable[[Any], None]) -> None:
    doc = json.loads(entries[name])
    edit(doc)
    entries[name] = json.dumps(doc).encode()


_CONSTANTS = "program/data/constants/model_constants_config.json"
_WEIGHTS = "program/data/weights/model_weights_config.json"
_PROGRAM = "program/models/model.json"


def _add_constant(entries: dict[str, bytes], path_name: str, record: str, payload: bytes) -> None:
    """A constant entry at ``path_name`` whose bytes live in record ``record``: torch's opaque/custom path."""
    def edit(doc: Any) -> None:
        doc["config"]["evil"] = {"path_name": path_name, "is_param": False, "use_pickle": True, "tensor_meta": None}

    _edit_json(entries, _CONSTANTS, edit)
    entries[f"program/data/constants/{record}"] = payload


def _refused(folder: Path, marker: Path, match: str, capsys: pytest.CaptureFixture[str] | None = None) -> None:
    """shear.load and ``shear inspect`` both refuse ``folder`` with ``match`` in the message; no marker."""
    with pytest.raises(CheckpointError, match=match):
        shear.load(folder)
    if capsys is not None:
        capsys.readouterr()
        assert main(["inspect", str(folder)]) == 1
        err = capsys.readouterr().err
        assert "program.pt2" in err and "re-save the model" in err
    assert not marker.exists()


# --- 1. program.pt2: every torch reader path that unpickles or evaluates ------------------------------------


def test_a_clean_program_loads_and_computes_the_same(graph_dir: Path, tiny: Any) -> None:
    check_program_archive(graph_dir / "program.pt2")
    first, again = shear.load(graph_dir), shear.load(graph_dir)
    ids = torch.randint(0, tiny.model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = tree_leaves(first(input_ids=ids)), tree_leaves(again(input_ids=ids))
    assert a and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_nested_opaque_object_record_does_not_run(graph_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"
    _poison(folder, lambda e: _add_constant(e, "opaque_obj_0/x", "opaque_obj_0/x", pickle.dumps(_Marker(marker))))
    _refused(folder, marker, r"opaque_obj_0/x.*(code or a pickle)", capsys)


def test_an_upper_case_opaque_object_record_does_not_run(graph_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"
    # torch's record lookup ignores case: the config's opaque_obj_0 finds the record OPAQUE_OBJ_0
    _poison(folder, lambda e: _add_constant(e, "opaque_obj_0", "OPAQUE_OBJ_0", pickle.dumps(_Marker(marker))))
    _refused(folder, marker, r"OPAQUE_OBJ_0.*code or a pickle", capsys)


def test_an_opaque_entry_in_the_config_alone_is_refused(graph_dir: Path, tmp_path: Path) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"
    _poison(folder, lambda e: _add_constant(e, "OPAQUE_OBJ_0", "tensor_0", pickle.dumps(_Marker(marker))))
    with pytest.raises(CheckpointError, match=r"(OPAQUE_OBJ_0|tensor_0).*(pickle|twice|confuses)"):
        shear.load(folder)
    assert not marker.exists()


def test_a_custom_object_constant_does_not_run(graph_dir: Path, tmp_path: Path) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"
    _poison(folder, lambda e: _add_constant(e, "custom_obj_0", "custom_obj_0", pickle.dumps(_Marker(marker))))
    _refused(folder, marker, r"custom_obj_0.*code or a pickle")


def test_a_use_pickle_weight_does_not_run(graph_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"

    def edit(entries: dict[str, bytes]) -> None:
        doc = json.loads(entries[_WEIGHTS])
        first = next(iter(doc["config"]))
        doc["config"][first]["use_pickle"] = True
        entries[_WEIGHTS] = json.dumps(doc).encode()
        buf = io.BytesIO()
        torch.save(_Marker(marker), buf)
        entries[f"program/data/weights/{doc['config'][first]['path_name']}"] = buf.getvalue()

    _poison(folder, edit)
    _refused(folder, marker, r"use_pickle.*would run code", capsys)


def test_a_use_pickle_constant_does_not_run(graph_dir: Path, tmp_path: Path) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"

    def edit(entries: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        torch.save(_Marker(marker), buf)

        def flip(doc: Any) -> None:
            doc["config"]["evil"] = {"path_name": "tensor_99", "is_param": False, "use_pickle": True, "tensor_meta": None}

        _edit_json(entries, _CONSTANTS, flip)
        entries["program/data/constants/tensor_99"] = buf.getvalue()

    _poison(folder, edit)
    _refused(folder, marker, r"use_pickle.*would run code")


def test_pickled_sample_inputs_do_not_run(graph_dir: Path, tmp_path: Path) -> None:
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"

    def edit(entries: dict[str, bytes]) -> None:
        buf = io.BytesIO()
        torch.save(((_Marker(marker),), {}), buf)
        entries["program/data/sample_inputs/model.pt"] = buf.getvalue()

    _poison(folder, edit)
    _refused(folder, marker, r"sample inputs.*asks to unpickle")


def test_legacy_pickled_weights_and_unknown_records_are_refused(graph_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for i, (record, match) in enumerate([
        ("program/data/weights/model.pt", r"model.pt.*code or a pickle"),
        ("program/data/aotinductor/model/model.so", r"records shear never writes"),
        ("program/extra/notes.txt", r"records shear never writes"),
        ("program/DATA/WEIGHTS/weight_0", r"names that torch's lookup confuses"),
        ("version", r"outside its program/ folder"),
    ]):
        folder = Path(shutil.copytree(graph_dir, tmp_path / f"gm{i}"))
        buf = io.BytesIO()
        torch.save(_Marker(marker), buf)
        payload = buf.getvalue()
        _poison(folder, lambda e, r=record, b=payload: e.__setitem__(r, b))
        with pytest.raises(CheckpointError, match=match):
            shear.load(folder)
    assert not marker.exists()


def test_code_in_the_programs_guards_expressions_or_targets_does_not_run(graph_dir: Path, tmp_path: Path) -> None:
    """program.module() exec-s guards_code, the deserializer sympify-s (evals) shape expressions and resolves
    a node target like torch.os.system to that function: each is refused before torch reads the program."""
    marker = tmp_path / "ran"

    def guards(doc: Any) -> None:
        doc["guards_code"] = [_shell(marker)]

    def expression(doc: Any) -> None:
        values = doc["graph_module"]["graph"]["sym_int_values"]
        next(iter(values.values()))["as_expr"]["expr_str"] = _shell(marker)

    def target(doc: Any) -> None:
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    for i, (edit, match) in enumerate([(guards, "guard"), (expression, "symbolic expression"), (target, "torch.os.system")]):
        folder = Path(shutil.copytree(graph_dir, tmp_path / f"gm{i}"))
        _poison(folder, lambda e, f=edit: _edit_json(e, _PROGRAM, f))
        with pytest.raises(CheckpointError, match=match):
            shear.load(folder)
    assert not marker.exists()


def test_the_second_guard_holds_when_the_archive_check_is_bypassed(
    graph_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With check_program_archive switched off, no_pickle alone still refuses torch's pickle.loads path."""
    folder, marker = _copy(graph_dir, tmp_path), tmp_path / "ran"
    _poison(folder, lambda e: _add_constant(e, "opaque_obj_0", "opaque_obj_0", pickle.dumps(_Marker(marker))))
    monkeypatch.setattr(checkpoint, "check_program_archive", lambda _f: None)
    with pytest.raises(CheckpointError, match="asks to unpickle"):
        shear.load(folder)
    assert not marker.exists()


def _sample_inputs_not_a_pair(entries: dict[str, bytes]) -> None:
    buf = io.BytesIO()
    torch.save([torch.zeros(1)], buf)
    entries["program/data/sample_inputs/model.pt"] = buf.getvalue()


def _missing_weight_record(entries: dict[str, bytes]) -> None:
    def edit(doc: Any) -> None:
        next(iter(doc["config"].values()))["path_name"] = "weight_999"

    _edit_json(entries, _WEIGHTS, edit)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda e: e.__setitem__("program/archive_format", b"zip"), r"archive_format is not 'pt2'"),
        (lambda e: e.pop("program/byteorder"), r"the archive lacks \['byteorder'\]"),
        (_missing_weight_record, r"names the record data/weights/weight_999, which is missing"),
        (lambda e: _edit_json(e, _PROGRAM, lambda d: d.__setitem__("guards_code", "L['x'].size()[0] > 1")),
         r"guards_code is not a list"),
        (lambda e: _edit_json(e, _PROGRAM, lambda d: d.__setitem__("guards_code", ["1 + " * 2000 + "1"])),
         r"a guard of the program is not a short string"),
        (_sample_inputs_not_a_pair, r"the sample inputs are a list, not \(args, kwargs\)"),
    ],
    ids=["archive-format", "lacks-record", "missing-payload-record", "guards-not-list", "long-guard", "inputs-not-pair"],
)
def test_an_archive_shear_save_would_not_write_is_refused(
    graph_dir: Path, tmp_path: Path, edit: Callable[[dict[str, bytes]], None], match: str
) -> None:
    folder = _copy(graph_dir, tmp_path)
    _poison(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        check_program_archive(folder / "program.pt2")
    with pytest.raises(CheckpointError, match=match):
        shear.load(folder)


def test_an_archive_holding_a_record_twice_is_refused(graph_dir: Path, tmp_path: Path) -> None:
    folder = _copy(graph_dir, tmp_path)
    with warnings.catch_warnings(), zipfile.ZipFile(folder / "program.pt2", "a") as z:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        z.writestr("program/byteorder", b"little")
    with pytest.raises(CheckpointError, match=r"holds records \['program/byteorder'\] twice"):
        check_program_archive(folder / "program.pt2")


_LOADER_MODULES = (
    "torch.export", "torch.export.pt2_archive._package", "torch.export.pt2_archive._package_weights",
    "torch._export.serde.serialize", "torch._export.serde.dynamic_shapes", "torch.export._unlift",
    "torch.export.exported_program",
)
"""What ``torch.export.load`` and ``ExportedProgram.module()`` run (found with inspect from the entry points)."""

_REVIEWED = {
    ("torch.export.pt2_archive._package", "_load_state_dict", "torch.load", "False"):
        "use_pickle weights: refused by the payload-config check; no_pickle forces weights_only",
    ("torch.export.pt2_archive._package", "_load_constants", "torch.load", "False"):
        "use_pickle constants: refused by the payload-config check; no_pickle forces weights_only",
    ("torch.export.pt2_archive._package", "_load_constants", "torch._C._pickle_load_obj", None):
        "custom_obj_ constants: path names other than tensor_<n> refused; no_pickle replaces it",
    ("torch.export.pt2_archive._package", "_load_constants", "pickle.loads", None):
        "opaque_obj_ constants: path names other than tensor_<n> refused; no_pickle replaces the module",
    ("torch.export.pt2_archive._package", "load_pt2", "torch.load", None):
        "load_weights_from_disk only (never set by torch.export.load); weights_only by default and by no_pickle",
    ("torch._export.serde.serialize", "deserialize_torch_artifact", "torch.load", "True"):
        "sample inputs: checked with the same weights_only reader first",
    ("torch._export.serde.serialize", "deserialize_torch_artifact", "torch.load", "False"):
        "the fallback after a weights_only failure: the sample-input check refuses such an archive; no_pickle raises",
    ("torch._export.serde.serialize", "GraphModuleDeserializer._parse_sym_expr", "sympy.sympify", None):
        "an eval of expr_str: every expr_str is checked against the sympy-constructor grammar",
    ("torch._export.serde.dynamic_shapes", "_load_dynamic_shapes", "sympy.sympify", None):
        "dynamic-shape specs: not on torch.export.load's path (shear never calls it)",
    ("torch.export._unlift", "_convert_guards_code_to_fn", "exec", None):
        "program.module() exec-s guards_code: every guard is checked against the guard grammar",
}
"""Every call site in torch's export loader that unpickles or evaluates, with how shear guards it."""

_RISKY = {"load", "loads", "_pickle_load_obj", "exec", "eval", "sympify", "parse_expr", "Unpickler",
          "import_module", "__import__", "_load_for_lite_interpreter", "load_obj"}


def _risky_calls(module: str) -> set[tuple[str, str, str, str | None]]:
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    found: set[tuple[str, str, str, str | None]] = set()
    stack: list[str] = []

    class Visit(ast.NodeVisitor):
        def scoped(self, node: ast.AST, name: str) -> None:
            stack.append(name)
            self.generic_visit(node)
            stack.pop()

        def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
            self.scoped(node, node.name)

        def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
            self.scoped(node, node.name)

        def visit_ClassDef(self, node: ast.ClassDef) -> None:
            self.scoped(node, node.name)

        def visit_Call(self, node: ast.Call) -> None:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            text = ast.unparse(f)
            if name in _RISKY and not text.startswith("json."):
                wo = next((ast.unparse(k.value) for k in node.keywords if k.arg == "weights_only"), None)
                found.add((module, ".".join(stack), text, wo))
            self.generic_visit(node)

    Visit().visit(tree)
    return found


def test_every_unpickling_or_eval_site_of_torchs_export_loader_is_reviewed() -> None:
    """A new torch reader path (a new pickle.load, torch.load(weights_only=False), exec or sympify in the
    export loader) fails this test until safe_archive is reviewed against it and it is added above."""
    entry_points = {inspect.getmodule(torch.export.load).__name__,  # type: ignore[union-attr]
                    inspect.getmodule(torch.export.pt2_archive._package.load_pt2).__name__}  # type: ignore[union-attr]
    assert entry_points <= set(_LOADER_MODULES)
    found = set().union(*(_risky_calls(m) for m in _LOADER_MODULES))
    unknown = sorted(found - set(_REVIEWED), key=str)
    assert not unknown, f"torch's export loader has unreviewed unpickling/eval call sites: {unknown}"


# --- 2. shear.json: a schema, field by field ----------------------------------------------------------------


def _manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    mf = folder / "shear.json"
    data = json.loads(mf.read_text())
    edit(data)
    mf.write_text(json.dumps(data))


def _norm(data: dict[str, Any]) -> str:
    return next(n for n in data["module_attrs"] if n.endswith("input_layernorm"))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["module_attrs"][_norm(d)].update(variance_epsilon=1000.0), r"variance_epsilon.*\(0, 1\]"),
        (lambda d: d["module_attrs"][_norm(d)].update(variance_epsilon=0.001), r"before pruning.*epsilons was edited"),
        (lambda d: d["module_attrs"][_norm(d)].update(variance_epsilon=1.2345678e-5), r"config.json's epsilon"),
        (lambda d: d["module_attrs"].update({"model.layers.0.self_attn": {"scaling": 50.0}}), r"self_attn\.scaling"),
        (lambda d: d["module_attrs"].update({"model.layers.0.self_attn": {"scaling": 0.5}}),
         r"scaling.*not an attribute a manifest may set on a LlamaAttention"),
        (lambda d: d["module_attrs"].update({"model.layers.0.mlp": {"forward": "x"}}), r"forward"),
        (lambda d: d["module_attrs"].update({"model.layers.0.mlp": {"__class__": 1.0}}), r"__class__"),
        (lambda d: d["module_attrs"].update({"model.nowhere": {"variance_epsilon": 1e-5}}), r"names no module"),
        (lambda d: d.update(evil=1), r"'evil' is not a field"),
        (lambda d: d["dtypes"].update({next(iter(d["dtypes"])): "os"}), r"dtypes.*torch dtype"),
        (lambda d: d["shapes"].update({next(iter(d["shapes"])): [-1, 3]}), r"shapes\..*non-negative"),
        (lambda d: d.update({"class": "os.system"}), r"'class'.*class name"),
        (lambda d: d["aliases"].update({"x": "nothing"}), r"aliases\.x.*saved tensor"),
        (lambda d: d.update(peft={"dir": "../elsewhere", "requires_grad": []}), r"peft"),
        (lambda d: d.update(requires_grad="all"), r"requires_grad"),
        (lambda d: d["files"].update({"x.json": {"size": "big", "sha256": "0"}}), r"files.*size or sha256"),
        (lambda d: d["files"].update({"../x.json": {"size": 1, "sha256": "0" * 64}}),
         r"'files'.*names '\.\./x\.json', not a relative file name inside the folder"),
        (lambda d: d.update(class_module="os system"), r"'class_module' must be a dotted module name"),
        (lambda d: d.update(transformers="yes"), r"'transformers' must be true or false"),
        (lambda d: d.update(none_modules=["../model"]), r"'none_modules' must be a list of tensor or module names"),
        (lambda d: d["module_attrs"][_norm(d)].update(eps=1e-5), r"module_attrs\..*must hold exactly one attribute"),
        (lambda d: d.update(weights=["config.json"]), r"'weights' must list plain \.safetensors file names"),
    ],
    ids=["eps-1000", "eps-one-norm", "eps-off-config", "scaling-50", "scaling", "forward", "dunder", "no-module", "unknown-field", "dtype",
         "shape", "class", "alias", "peft-dir", "requires-grad", "file-entry", "file-outside", "class-module", "transformers",
         "none-modules", "two-attrs", "weights"],
)
def test_an_edited_manifest_is_refused_naming_the_field(
    model_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    folder = _copy(model_dir, tmp_path)
    _manifest(folder, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        shear.load(folder)
    assert "shear.json" in str(e.value) and ("re-save" in str(e.value) or "Re-save" in str(e.value))


def test_a_rescaled_epsilon_that_matches_the_config_loads(model_dir: Path) -> None:
    data = json.loads((model_dir / "shear.json").read_text())
    assert data["module_attrs"], "the tiny LLaMA's norms are recorded"
    assert isinstance(shear.load(model_dir), nn.Module)


def test_a_manifest_nested_200000_deep_is_a_checkpoint_error(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(model_dir, tmp_path)
    (folder / "shear.json").write_text('{"format": "shear-checkpoint", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match=r"shear.json is corrupt or crafted: nested too deeply.*Re-save"):
        shear.load(folder)


def test_a_manifest_over_the_size_limit_is_refused_unread(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _copy(model_dir, tmp_path)
    monkeypatch.setattr(checkpoint, "_MAX_MANIFEST", 100)
    with pytest.raises(CheckpointError, match=r"shear.json is corrupt or crafted: larger than 100 bytes\. Re-save"):
        shear.load(folder)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["graph_module"]["constants"].update(use_cache={"__reduce__": "os.system"}),
         r"graph_module.constants.use_cache.*plain value"),
        (lambda d: d["graph_module"].update(code="x"), r"'graph_module' must hold exactly file and constants"),
        (lambda d: d["graph_module"].update(file="evil.pt2"), r"'graph_module' names the program 'evil.pt2'; it must be program.pt2"),
    ],
    ids=["constants", "keys", "file"],
)
def test_a_graph_module_manifest_is_checked(
    graph_dir: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    folder = _copy(graph_dir, tmp_path)
    _manifest(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        shear.load(folder)


class _Norms(nn.Module):
    """Two norm families of one width, as Qwen3's q_norm (head_dim wide) and its hidden norms pruned to that width."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q_norm": nn.RMSNorm(32, eps=1e-6), "hidden_norm": nn.RMSNorm(32, eps=1e-6)})
                                    for _ in range(2))


def test_norm_families_of_one_width_are_checked_apart() -> None:
    """Hidden norms pruned 64 -> 32 (eps doubled) beside q_norms never pruned (32): both legitimate."""
    attrs = {f"layers.{i}.{n}": {"eps": e} for i in range(2) for n, e in (("q_norm", 1e-6), ("hidden_norm", 2e-6))}
    check_module_attrs(_Norms(), attrs, "shear.json")
    attrs["layers.1.hidden_norm"] = {"eps": 4e-6}  # one layer's hidden norm edited to another whole width
    with pytest.raises(CheckpointError, match=r"layers.1.hidden_norm.eps.*128 wide before pruning while "
                                              r"layers.0.hidden_norm.*was 64: one of the epsilons was edited"):
        check_module_attrs(_Norms(), attrs, "shear.json")


# --- 3. trainer.json ---------------------------------------------------------------------------------------


def _train_checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", 3, model=nn.Linear(4, 2), extra={"x": torch.zeros(1)},
                           info={"losses": [1.0, 0.9, 0.8], "tokens": 12, "finished": False})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(evil=1), r"unknown fields \['evil'\]"),
        (lambda d: d.update(losses=["NaN"]), r"'losses'"),
        (lambda d: d.update(tokens=-5), r"'tokens'"),
        (lambda d: d.update(step=4), r"says step 4, the folder is step-3"),
        (lambda d: d.update(aliases={"x": "missing"}), r"aliases 'x' to 'missing'"),
        (lambda d: d.update(version="2"), r"version"),
    ],
    ids=["unknown", "losses", "tokens", "step", "alias", "version"],
)
def test_an_edited_training_record_is_refused(tmp_path: Path, edit: Callable[[dict[str, Any]], None], match: str) -> None:
    step = _train_checkpoint(tmp_path)
    assert load_checkpoint(step).step == 3
    info = json.loads((step / "trainer.json").read_text())
    edit(info)
    (step / "trainer.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(step)


def test_a_training_record_nested_200000_deep_is_a_checkpoint_error(tmp_path: Path) -> None:
    step = _train_checkpoint(tmp_path)
    (step / "trainer.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match=r"trainer.json does not parse.*nested too deeply") as e:
        load_checkpoint(step)
    assert "shear.save" not in str(e.value)  # one fix: delete it (or start over), not re-save a model


def test_a_diverged_runs_nan_losses_are_resumable(tmp_path: Path) -> None:
    step = save_checkpoint(tmp_path / "ckpt", 2, model=nn.Linear(4, 2), extra={},
                           info={"losses": [float("nan"), float("inf")], "tokens": 8})
    losses = load_checkpoint(step).info["losses"]
    assert math.isnan(losses[0]) and losses[1] == math.inf


def test_a_checkpoint_dir_linking_nowhere_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "ckpt"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match=r"checkpoint_dir .*ckpt is a symbolic link to nowhere; give a real folder"):
        check_checkpoint_dir(link)


def _sharded_record(tmp_path: Path, **fields: Any) -> Path:
    step = tmp_path / "ckpt" / "step-3"
    step.mkdir(parents=True)
    (step / "rank0.json").write_text("{}")
    record = {"format": SHARDED_FORMAT, "version": 1, "step": 3, "world_size": 2,
              "files": {"rank0.json": {"size": 2, "sha256": sha256_file(step / "rank0.json")}}, **fields}
    (step / "trainer.json").write_text(json.dumps(record))
    return step


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"world_size": 4}, r"written by 4 processes and this run has 2"),
        ({"version": "1"}, r"trainer.json's version is '1', not a number"),
        ({"version": 7}, r"format version 7; this shear reads up to 1"),
        ({"world_size": "2"}, r"field 'world_size' has a value of the wrong type"),
        ({"files": {"../../outside": {"size": 1, "sha256": "0" * 64}}}, r"field 'files' has a value of the wrong type"),
        ({"files": {"rank0.json": 5}}, r"field 'files' has a value of the wrong type"),
        ({"files": {"rank0.json": {"size": 3, "sha256": "0" * 64}}}, r"rank0.json has 2 bytes, the record says 3"),
        ({"evil": 1}, r"unknown fields \['evil'\]"),
        ({"format": "shear-train-checkpoint"}, r"not a sharded \(FSDP\) checkpoint"),
    ],
    ids=["world-size", "version-type", "version-newer", "world-size-type", "dotdot-path", "entry-not-object", "size",
         "unknown", "plain-format"],
)
def test_an_edited_sharded_training_record_is_refused(tmp_path: Path, fields: dict[str, Any], match: str) -> None:
    step = _sharded_record(tmp_path, **fields)
    with pytest.raises(CheckpointError, match=match):
        check_sharded_checkpoint(step, 2)


def test_a_sharded_record_nested_200000_deep_is_a_checkpoint_error(tmp_path: Path) -> None:
    step = _sharded_record(tmp_path)
    assert check_sharded_checkpoint(step, 2)["world_size"] == 2  # the record as written passes
    (step / "trainer.json").write_text('{"format": "' + SHARDED_FORMAT + '", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match=r"trainer.json does not parse.*nested too deeply.*Delete"):
        check_sharded_checkpoint(step, 2)


# --- 4. remote code: refused before transformers sees the folder ------------------------------------------


def _remote_code_folder(tmp_path: Path, config_file: str) -> tuple[Path, Path]:
    """The tiny LLaMA folder with an auto_map in ``config_file`` pointing at a module that writes a marker."""
    folder, marker = Path(shutil.copytree(TINY_LLAMA_DIR, tmp_path / "hf")), tmp_path / "ran"
    (folder / "evil.py").write_text(f"{_shell(marker)}\nclass Evil: pass\n")
    cfg = json.loads((folder / config_file).read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
    (folder / config_file).write_text(json.dumps(cfg))
    return folder, marker


@pytest.mark.parametrize(
    "command, config_file",
    [("inspect", "config.json"), ("inspect", "tokenizer_config.json"), ("prune", "config.json"),
     ("prune", "tokenizer_config.json"), ("plan", "config.json"), ("export", "tokenizer_config.json"),
     ("export", "config.json")],
)
def test_a_folder_asking_for_remote_code_is_refused_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, config_file: str, command: str
) -> None:
    folder, marker = _remote_code_folder(tmp_path, config_file)
    monkeypatch.setattr("builtins.input", lambda *_a: "y")  # a user who would say yes to transformers' prompt
    argv = {
        "inspect": ["inspect", str(folder)],
        "prune": ["prune", str(folder), "--passes", PRUNE, "--data", "none", "-o", str(tmp_path / "out")],
        "plan": ["plan", str(folder)],
        "export": ["export", str(TINY_LLAMA_DIR), "--tokenizer", str(folder), "-o", str(tmp_path / "m.gguf")],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{folder / config_file}" in err and "auto_map" in err and "never runs a model folder's code" in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_shear_load_refuses_a_saved_folder_asking_for_remote_code(model_dir: Path, tmp_path: Path) -> None:
    folder, marker = _copy(model_dir, tmp_path), tmp_path / "ran"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (folder / "config.json").write_text(json.dumps(cfg))
    _rehash(folder, "config.json")
    with pytest.raises(ModelLoadError, match=r"config.json asks for code shipped with the model \(auto_map\)"):
        shear.load(folder)
    assert not marker.exists()


def _inspect_refuses(folder: Path, marker: Path, capsys: pytest.CaptureFixture[str], match: str) -> None:
    """``shear inspect folder`` fails with ``match`` and no traceback; the folder's code never ran."""
    assert main(["inspect", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(match, err), err
    assert not marker.exists()


def test_a_config_over_the_size_limit_is_refused_not_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers reads a config of any size: one too large to check (here the limit is lowered from
    64 MiB; the padding is whitespace, valid JSON) is refused, not passed over."""
    folder, marker = _remote_code_folder(tmp_path, "config.json")
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text() + " " * 4096)
    monkeypatch.setattr("shear.io.remote_code._MAX_CONFIG", 2048)
    monkeypatch.setattr("builtins.input", lambda *_a: "y")
    _inspect_refuses(folder, marker, capsys, rf"{re.escape(str(cfg))} is corrupt or crafted: larger than 2048 bytes: "
                                             r"shear cannot check it.*Fix or remove config.json")


def test_a_config_nested_too_deep_to_parse_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = _remote_code_folder(tmp_path, "config.json")
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text()[:-1] + ', "padding": ' + "[" * 200_000 + "]" * 200_000 + "}")
    monkeypatch.setattr("builtins.input", lambda *_a: "y")
    _inspect_refuses(folder, marker, capsys, r"config.json is corrupt or crafted: nested too deeply to read: shear cannot check it")


def test_a_top_level_auto_map_is_found_above_deeply_nested_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, marker = _remote_code_folder(tmp_path, "config.json")
    cfg = json.loads((folder / "config.json").read_text())
    nested: dict[str, Any] = {}
    for _ in range(500):
        nested = {"text_config": nested}
    (folder / "config.json").write_text(json.dumps({**cfg, **nested}))
    monkeypatch.setattr("builtins.input", lambda *_a: "y")
    _inspect_refuses(folder, marker, capsys, r"config.json asks for code shipped with the model \(auto_map\)")
    del cfg["auto_map"]
    (folder / "config.json").write_text(json.dumps({**cfg, **nested}))
    _inspect_refuses(folder, marker, capsys, r"config.json nests configs more than 8 deep \(text_config\.text_config\..*Fix or remove")


# --- 5. devices --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_shear_load_on_a_missing_cuda_device_is_an_input_error(model_dir: Path) -> None:
    with pytest.raises(InputError, match=r"shear.load\(device=...\) 'cuda': this machine has no CUDA device.*\['cpu'"):
        shear.load(model_dir, device="cuda")


@pytest.mark.parametrize("device, match", [
    pytest.param("cuda:0", r"--device 'cuda:0': this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ("toaster:7", r"--device 'toaster:7' is not a torch device.*give one of \['cpu'"),
    ("cuda:99", r"--device 'cuda:99': there are \d+ cuda devices" if torch.cuda.is_available()
     else r"--device 'cuda:99': this machine has no CUDA device"),
])
def test_cli_device_the_machine_lacks_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, device: str, match: str
) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr("shear.cli.load_model", boom)
    out = tmp_path / "out"
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--device", device, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(match, err), err
    assert not out.exists()
