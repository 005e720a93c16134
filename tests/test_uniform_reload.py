"""A uniform-width prune loads in stock transformers: ``save_pretrained`` here, a plain
``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter that never imports shear."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shear
from shear.zoo import load_tiny_llama

_CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[3])
assert "shear" not in sys.modules
print(type(model).__name__)
"""


def _reload_in_fresh_process(folder: Path, ids: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    out = tmp_path / "logits.pt"
    run = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, str(folder), json.dumps(ids.tolist()), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("LlamaForCausalLM")
    return torch.load(out)


@pytest.mark.parametrize("save", ["save_pretrained", "shear.save"])
def test_uniform_prune_reloads_with_plain_from_pretrained(tmp_path: Path, save: str) -> None:
    model = load_tiny_llama().model
    small = shear.compile(model, "discover-groups,random{ratio=0.3,seed=0},erase")
    layers = small.model.layers
    assert len({(m.self_attn.q_proj.out_features, m.mlp.gate_proj.out_features) for m in layers}) == 1
    assert small.model.embed_tokens.weight.shape[1] < 128, "the residual width is pruned too"
    folder = tmp_path / "m"
    if save == "save_pretrained":
        small.save_pretrained(folder)
    else:
        shear.save(small, folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == layers[0].mlp.gate_proj.out_features
    assert config["num_attention_heads"] == layers[0].self_attn.q_proj.out_features // 32
    ids = torch.randint(0, 2048, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = small(input_ids=ids).logits
    got = _reload_in_fresh_process(folder, ids, tmp_path)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_shared_selection_keeps_every_layer_alike(tmp_path: Path) -> None:
    """``selection="shared"`` (LHSPG's option, the budget's rule): per-layer scores pick the
    structures, every layer removes the same count, and the result loads in stock transformers.
    ``uniform`` tops its fraction up group by group and leaves the layers uneven at this target."""
    from shear.kernels.allocation import ParamBudget, zero_to_budget

    model = load_tiny_llama().model
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    groups = [
        g for g in shear.trace(model, (ids,)).pruning_groups if g.prunable and g.kind in ("channel", "head")
    ]
    gen = torch.Generator().manual_seed(0)
    scores = {g.id: torch.rand(g.size, generator=gen) for g in groups}
    budget = ParamBudget(model, groups)
    uneven = budget.counts(0.2, scores, selection="uniform")
    shared = budget.counts(0.2, scores, selection="shared")
    channels = [g.id for g in groups if g.kind == "channel"]
    assert len({uneven[g] for g in channels}) > 1
    assert len({shared[g] for g in channels}) == 1
    assert abs(budget.reduction(shared) - 0.2) <= 0.005

    zero_to_budget(model, groups, scores, 0.2, selection="shared")
    small = shear.compile(model, "discover-groups,erase")
    widths = {m.mlp.gate_proj.out_features for m in small.model.layers}
    assert widths == {384 - shared[channels[0]]}
    small.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        want = small(input_ids=ids).logits
    torch.testing.assert_close(
        _reload_in_fresh_process(tmp_path / "m", ids, tmp_path), want, rtol=0, atol=1e-5
    )
