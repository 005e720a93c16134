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
from pathlib import Path
from typing import Any

import pytest
import torch

import shear
from shear.cli import main
from shear.data import TextData
from shear.errors import ExportError, InputError, ModelLoadError, PipelineError, ShearError
from shear.passes import Context, PassManager
from shear.passes.knowledge import KnowledgeDistribution
from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama


@pytest.fixture(scope="module")
def tiny() -> Any:
    return load_tiny_llama()


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
    "no entries", "missing group", "wrong group id", "wrong node group id", "NaN deviation",
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
    reloaded = _kd_run(tiny.model, data, tmp_path)  # the good file is used again, silently
    assert not reloaded.warnings and reloaded.get(KnowledgeDistribution) == fresh
