"""The ``shear`` command line, run as a subprocess on a saved tiny LLaMA directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shear
import shear.zoo
from shear.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NO_COLOR="1")
    return subprocess.run(
        [sys.executable, "-m", "shear.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_passes_lists_registered_passes_with_options() -> None:
    r = run_cli("passes")
    assert r.returncode == 0, r.stderr
    assert "discover-groups" in r.stdout and "random" in r.stdout and "erase" in r.stdout
    assert "ratio" in r.stdout and "float" in r.stdout


def test_passes_one_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes", "random"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "discover-groups" not in out
    assert main(["passes", "randon"]) == 1
    assert "unknown pass 'randon'; did you mean 'random'?" in capsys.readouterr().err


def test_inspect_prints_the_groups_table(tiny_dir: Path) -> None:
    r = run_cli("inspect", str(tiny_dir), "--all")
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.mlp/channel" in r.stdout and "prunable" in r.stdout and "pinned:" in r.stdout
    assert "prunable of" in r.stdout


def test_draw(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dot = run_cli("draw", str(tiny_dir), "-o", str(tmp_path / "groups.dot"))
    assert dot.returncode == 0, dot.stderr
    assert (tmp_path / "groups.dot").read_text().lstrip().startswith(("digraph", "graph", "strict"))
    code = main(["draw", str(tiny_dir), "-o", str(tmp_path / "groups.svg")])
    if shutil.which("dot"):
        assert code == 0 and (tmp_path / "groups.svg").is_file()
    else:
        assert code == 1 and "install graphviz" in capsys.readouterr().err.lower()


def test_prune_saves_a_smaller_model(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned"
    r = run_cli("prune", str(tiny_dir), "--passes", "random{ratio=0.3,seed=0},erase", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "equivalence max |diff|" in r.stdout and f"saved to {out}" in r.stdout
    assert "pass erase" in r.stderr  # the rich progress bar renders on stderr

    import shear

    small = shear.load(out)
    original = sum(p.numel() for p in shear.load(tiny_dir).parameters()) if (tiny_dir / "shear.json").exists() else None
    assert original is None or sum(p.numel() for p in small.parameters()) < original
    assert main(["inspect", str(out)]) == 0  # a shear.save directory loads too
    assert "prunable of" in capsys.readouterr().out


def test_prune_with_a_pipeline_file_and_a_bad_one(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "p.toml"
    good.write_text('[[passes]]\nname = "random"\nratio = 0.3\n\n[[passes]]\nname = "erase"\n')
    assert main(["prune", str(tiny_dir), "--pipeline", str(good), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "shear.json").is_file()
    assert main(["prune", str(tiny_dir), "--passes", "random{ratio=lots}", "-o", str(tmp_path / "x")]) == 1
    assert "option 'ratio' expects float, got 'lots'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_hub_id_says_download_it_first() -> None:
    r = run_cli("inspect", "meta-llama/Llama-2-7b-hf")
    assert r.returncode == 1
    assert "looks like a Hugging Face hub id" in r.stderr and "download it first" in r.stderr
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in r.stderr


@pytest.mark.parametrize("kind", ["missing", "file", "empty-dir", "corrupt"])
def test_broken_model_paths(kind: str, tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model"
    if kind == "file":
        path.write_text("not a model")
    elif kind == "empty-dir":
        path.mkdir()
    elif kind == "corrupt":
        shutil.copytree(tiny_dir, path)
        (path / "config.json").write_text("{ not json")
    if kind == "corrupt":  # loads transformers: in-process is much cheaper than a fresh interpreter
        assert main(["inspect", str(path)]) == 1
        stderr = capsys.readouterr().err
    else:
        r = run_cli("inspect", str(path))
        assert r.returncode == 1
        stderr = r.stderr
    expected = {
        "missing": "does not exist",
        "file": "is a file; expected a directory",
        "empty-dir": "no config.json",
        "corrupt": "config.json is corrupt or",  # read (for remote code) before transformers sees it
    }[kind]
    assert expected in stderr and "Traceback" not in stderr


def test_usage_errors_exit_2() -> None:
    r = run_cli("prune", "somewhere")
    assert r.returncode == 2 and "-o/--output" in r.stderr


def test_prune_with_lhspg_on_the_tiny_trained_llama_and_corpus_data(tmp_path: Path) -> None:
    from shear.zoo import TINY_LLAMA_DIR

    out = tmp_path / "pruned"
    passes = "lora,discover-groups,lhspg{ratio=0.2,periods=1,steps_per_period=2,warmup=0,batch_size=1,seq_len=32},erase,merge-lora"
    r = run_cli("prune", str(TINY_LLAMA_DIR), "--passes", passes, "--data", "corpus", "-o", str(out), "--no-eval")
    assert r.returncode == 0, r.stderr
    small = shear.load(out)
    full = sum(p.numel() for p in shear.zoo.load_tiny_llama().model.parameters())
    assert abs(1 - sum(p.numel() for p in small.parameters()) / full - 0.2) <= 0.01


def test_prune_writes_the_html_report(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    r = run_cli("prune", str(tiny_dir), "--passes", "random{ratio=0.3,seed=0},erase", "-o", str(out))
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()  # next to the model by default
    assert f"report: {out / 'report.html'}" in r.stdout and '<section id="widths">' in page
    assert shear.load(out) is not None  # the report is listed and hashed in the saved folder's manifest
    again = run_cli("prune", str(tiny_dir), "--passes", "erase", "-o", str(tmp_path / "b"), "--report", str(out / "report.html"))
    assert again.returncode != 0 and "report.html exists; pass overwrite=True (--overwrite)" in again.stderr and not (tmp_path / "b").exists()
    assert main(["prune", str(tiny_dir), "--passes", "erase", "-o", str(tmp_path / "c"), "--no-report"]) == 0
    assert not (tmp_path / "c" / "report.html").exists()


def test_prune_with_a_named_budget(tmp_path: Path) -> None:
    """``shear prune MODEL --ratio 0.2 --budget quick``: the LoRAShear pipeline with the quick step counts."""
    from shear.passes.budgets import lorashear_pipeline
    from shear.zoo import TINY_LLAMA_DIR

    out = tmp_path / "pruned"
    r = run_cli("prune", str(TINY_LLAMA_DIR), "--ratio", "0.2", "--budget", "quick", "--data", "corpus", "-o", str(out),
                timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"LoRAShear with budget quick (--budget): {lorashear_pipeline(0.2, 'quick')}" in r.stderr
    assert "budget quick (--budget): LHSPG 256 tokens (4 steps of 1 x 64)" in r.stderr and "estimated time on cpu" in r.stderr
    cached = list((tmp_path / "shear-kd-cache").glob("knowledge-*.json"))  # next to the output, for a rerun
    assert len(cached) == 1 and f"cached in {cached[0].parent}" in r.stderr
    small = shear.load(out)
    full = sum(p.numel() for p in shear.zoo.load_tiny_llama().model.parameters())
    assert abs(1 - sum(p.numel() for p in small.parameters()) / full - 0.2) <= 0.01
    page = (out / "report.html").read_text()
    assert "LHSPG loss per step" in page and "not run: recover-dynamic" not in page
    stamp = cached[0].stat().st_mtime_ns
    again = run_cli("prune", str(TINY_LLAMA_DIR), "--ratio", "0.3", "--budget", "quick", "--data", "corpus", "-o",
                    str(tmp_path / "pruned-30"), "--no-verify", "--no-eval", timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "loaded from" in (tmp_path / "pruned-30" / "report.html").read_text()  # another ratio: measured once
    assert list((tmp_path / "shear-kd-cache").iterdir()) == cached and cached[0].stat().st_mtime_ns == stamp
    bad = run_cli("prune", str(TINY_LLAMA_DIR), "--passes", "erase", "--budget", "paper", "-o", str(tmp_path / "x"))
    assert bad.returncode == 1 and "without --passes" in bad.stderr
