"""A Nemotron-NAS folder in a real reader: llama.cpp's own converter, then llama.cpp itself.

A SmolLM2 with per-layer MLP widths in multiples of 256 is saved with ``target="nas"``; llama.cpp's
``convert_hf_to_gguf.py`` (``$SHEAR_LLAMA_CPP_SRC``: a llama.cpp source tree, or a llama-cpp-python
sdist ``.tar.gz`` whose ``vendor/llama.cpp`` holds it) turns the folder into an f16 GGUF, and
llama.cpp (``llama-cpp-python`` in ``$SHEAR_LLAMA_CPP_PYTHON``, or in this interpreter) runs it: its
logits must match shear's model within f16 rounding and its greedy continuation must be the same.

One thing is patched in the converter, and only for the vocabulary: its DeciLM class reads a
LLaMA-3 vocabulary (128256 tokens) or a SentencePiece-style BPE, and SmolLM2's byte-level BPE is
neither, so the test points ``DeciModel.set_vocab`` at the converter's own GPT-2 BPE reader (what
its LLaMA class uses for SmolLM2). The config, the tensors and their rope permutation are the
converter's own reading of the folder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from model_fixtures import load_smollm2_once
from torch import nn

import shear
from shear.io.folder_formats import describe_folder

_CONVERT = """
import runpy, sys
root, folder, out = sys.argv[1:4]
sys.path[:0] = [root, root + "/gguf-py"]
try:
    from conversion.deci import DeciModel
except ImportError:  # llama.cpp before the conversion/ package: one file
    import convert_hf_to_gguf as single
    DeciModel = single.DeciModel
# SmolLM2's byte-level BPE: DeciLM's converter reads only LLaMA-3 and SentencePiece vocabularies
DeciModel.set_vocab = DeciModel._set_vocab_gpt2
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f16"]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made books cheaper "
        "to produce. Within fifty years, presses had spread to hundreds of European cities, and the number of "
        "books in circulation grew from thousands to millions.")
PROMPT = "The capital of France is"


def _llama_cpp_tree(tmp: Path) -> Path:
    """The llama.cpp tree holding ``convert_hf_to_gguf.py`` from ``$SHEAR_LLAMA_CPP_SRC``; skips without it."""
    src = os.environ.get("SHEAR_LLAMA_CPP_SRC")
    if not src:
        pytest.skip("set SHEAR_LLAMA_CPP_SRC to a llama.cpp source tree or a llama-cpp-python sdist (.tar.gz)")
    path = Path(src)
    if path.is_dir():
        found = sorted(path.rglob("convert_hf_to_gguf.py"))
        if not found:
            pytest.skip(f"no convert_hf_to_gguf.py under SHEAR_LLAMA_CPP_SRC={src}")
        return found[0].parent
    if not tarfile.is_tarfile(path):
        pytest.skip(f"SHEAR_LLAMA_CPP_SRC={src} is neither a folder nor a .tar.gz")
    with tarfile.open(path) as tar:
        wanted = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and m.isfile() and (
            m.name.endswith("/convert_hf_to_gguf.py") or "/conversion/" in m.name or "/gguf-py/" in m.name)]
        if not any(m.name.endswith("/convert_hf_to_gguf.py") for m in wanted):
            pytest.skip(f"{src} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(tmp, members=wanted, filter="data")
    return next(tmp.rglob("convert_hf_to_gguf.py")).parent


def _llama_cpp_python() -> str | None:
    if os.environ.get("SHEAR_LLAMA_CPP_PYTHON"):
        return os.environ["SHEAR_LLAMA_CPP_PYTHON"]
    return sys.executable if importlib.util.find_spec("llama_cpp") else None


def _per_layer_mlp(model: nn.Module, keep: list[int]) -> nn.Module:
    """``model`` with layer ``i`` keeping its ``keep[i]`` MLP channels of largest gate x up x down norm."""
    with torch.no_grad():
        for layer, k in zip(model.model.layers, keep):
            mlp = layer.mlp
            score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
            drop = score.argsort()[: score.numel() - k]
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
    return shear.compile(model, "discover-groups,erase")


@pytest.mark.slow
def test_nas_folder_converts_and_runs_in_llama_cpp(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    root = _llama_cpp_tree(tmp_path / "llama.cpp")
    import copy

    loaded, _, _ = load_smollm2_once(tmp_path_factory)
    model, tokenizer = copy.deepcopy(loaded.model), loaded.tokenizer  # type: ignore[attr-defined]
    keep = [(1536, 1280, 1024)[i % 3] for i in range(len(model.model.layers))]
    small = _per_layer_mlp(model.eval(), keep)
    folder = shear.save(small, tmp_path / "nas", tokenizer=tokenizer)  # auto: per-layer, multiples of 256
    assert describe_folder(folder).format == "nas"

    gguf_path = tmp_path / "m.gguf"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(root), str(folder), str(gguf_path)],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "deci"
    ff = [int(x) for x in fields["deci.feed_forward_length"].contents()]
    assert ff == keep  # the converter's ffn_mult formula gave back every layer's width
    assert [int(x) for x in fields["deci.attention.head_count_kv"].contents()] == [3] * len(keep)

    python = _llama_cpp_python()
    if python is None:
        pytest.skip("the conversion is checked; llama-cpp-python is not installed to run the file "
                    "(set SHEAR_LLAMA_CPP_PYTHON to an interpreter that has it)")
    from tools import gguf_check as tool

    ids = tokenizer(TEXT)["input_ids"]
    prompt = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        want = small(torch.tensor([ids])).logits[0].float().numpy()
    cont = tool.greedy_ids(small, prompt, 32)
    request = {"gguf": str(gguf_path), "logits_ids": ids, "prompt_ids": prompt, "new": 32, "text": TEXT, "threads": 1}
    got = tool.run_client(python, request, tmp_path)
    rel = float(np.abs(got["logits"] - want).max() / np.abs(want).max())
    assert rel <= 5e-3, f"max |diff| / max |logit| = {rel:.2e}"
    assert got["greedy"] == cont
    assert got["tokens"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
