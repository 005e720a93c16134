"""Speed measured dense vs pruned: tokens/s rows, the efficiency arithmetic, slow widths in the report,
``shear bench`` (torch models and, through a stand-in binding, GGUF files) and its install message."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hand_groups import tiny_llama

import shear
from shear.cli import main
from shear.errors import InputError, ModelError, ModelLoadError
from shear.evaluation.llama_cpp_speed import check_gguf_file, gguf_speed, require_llama_cpp
from shear.evaluation.slow_widths import slow_widths
from shear.evaluation.speed import compare_speed, measure_speed, speed_row
from shear.kernels.allocation import base_param_count
from shear.report import render
from shear.report.collect import ReportData

TINY = dict(batches=(1, 2), prompt_tokens=8, new_tokens=3, repeats=1)
"""The smallest measurement that still has every row."""


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny LLaMA and its random-pruned, erased copy: MLP 96 -> 67 channels, hidden 64 -> 45 (not multiples of 8)."""
    dense = tiny_llama()
    return dense, shear.compile(dense, "random{ratio=0.3,seed=0},erase")


def test_measure_speed_gives_positive_tokens_per_second_for_every_row() -> None:
    model = tiny_llama()
    result = measure_speed(model, **TINY)
    assert list(result.rates) == ["prefill b1", "prefill b2", "decode b1", "decode b2"]
    assert all(isinstance(r, float) and r > 0 for r in result.rates.values()), result.rates
    assert result.params == base_param_count(model) and "threads" in result.device
    assert result.load_average is not None and result.settings["new_tokens"] == 3


def test_efficiency_is_speedup_over_the_parameter_ratio(pair: tuple[Any, Any]) -> None:
    dense, pruned = pair
    result = compare_speed(dense, pruned, granularity=8, **TINY)
    assert result.dense_params == base_param_count(dense) > result.pruned_params == base_param_count(pruned)
    assert result.ideal == pytest.approx(result.dense_params / result.pruned_params)
    assert [r.name for r in result.rows] == ["prefill b1", "prefill b2", "decode b1", "decode b2"]
    for r in result.rows:
        assert r.dense and r.pruned and not r.note
        assert r.speedup == pytest.approx(r.pruned / r.dense)
        assert r.efficiency == pytest.approx(r.speedup / result.ideal)
    row = speed_row("x", 100.0, 150.0, ideal=1.25)
    assert (row.speedup, row.efficiency) == (pytest.approx(1.5), pytest.approx(1.2))
    missing = speed_row("x", "not measured: no generate()", 150.0, ideal=1.25)
    assert missing.speedup is None and missing.efficiency is None and "dense: not measured: no generate()" in missing.note


def test_planted_slow_width_is_reported_in_the_speed_section(pair: tuple[Any, Any]) -> None:
    dense, pruned = pair
    result = compare_speed(dense, pruned, granularity=8, **TINY)
    assert "mlp.down_proj in_features 67 (layers 0-1)" in result.slow_widths
    assert "mlp.gate_proj, mlp.up_proj out_features 67 (layers 0-1)" in result.slow_widths
    text = result.format()
    assert "mlp.down_proj in_features 67" in text and "prune with --target cpu" in text and "efficiency" in text
    page = render(ReportData(title="run", speed=result.to_dict()))
    speed = page[page.index('<section id="speed">') :]
    speed = speed[: speed.index("</section>")]
    assert "mlp.down_proj in_features 67 (layers 0-1)" in speed and "prune with --target cpu" in speed
    assert "prefill b1" in speed and "efficiency" in speed
    assert "speed was not measured" in render(ReportData(title="run"))
    rounded = shear.compile(dense, "random{ratio=0.3,seed=0,round_to=8},erase")  # the fix: widths in multiples of 8
    assert slow_widths(rounded, 8, reference=dense) == []


def test_slow_widths_leave_out_the_dense_models_own_widths(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = tiny_llama(intermediate_size=90)
    assert slow_widths(odd, 8) == ["mlp.down_proj in_features 90 (layers 0-1)", "mlp.gate_proj, mlp.up_proj out_features 90 (layers 0-1)"]
    assert slow_widths(odd, 8, reference=odd) == [] and slow_widths(odd, 1) == []
    monkeypatch.setenv("SHEAR_WIDTH_GRANULARITY", "10")  # the default granularity is the device's (here pinned)
    result = compare_speed(odd, odd, batches=(1,), prompt_tokens=4, new_tokens=2, repeats=1)
    assert result.granularity == 10 and "pinned" in result.granularity_source and result.slow_widths == []


def test_static_decode_compile_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()

    def refuse(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", refuse)
    rates = measure_speed(model, batches=(1,), prompt_tokens=4, new_tokens=2, repeats=1, mode="static").rates
    assert list(rates) == ["prefill b1", "decode b1 static"]
    assert rates["decode b1 static"] == "not measured: RuntimeError: no C++ compiler"

    def broken(*args: object, **kwargs: object) -> object:
        def call(**kw: object) -> object:
            raise RuntimeError("inductor failed")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    rates = measure_speed(model, batches=(1,), prompt_tokens=4, new_tokens=3, repeats=1, mode="both").rates
    assert isinstance(rates["decode b1"], float)
    assert rates["decode b1 static"] == "not measured: torch.compile with a StaticCache failed: RuntimeError: inductor failed"


@pytest.mark.slow
def test_static_cache_compiled_decode_measures_tokens_per_second() -> None:
    rates = measure_speed(tiny_llama(), batches=(1,), prompt_tokens=4, new_tokens=3, repeats=1, mode="static").rates
    assert isinstance(rates["decode b1 static"], float) and rates["decode b1 static"] > 0, rates


def test_measure_speed_errors() -> None:
    with pytest.raises(ModelError, match="no config.vocab_size"):
        measure_speed(torch.nn.Linear(4, 4))
    with pytest.raises(InputError, match="speed mode 'fast' is not one of eager, static, both"):
        measure_speed(tiny_llama(), mode="fast")
    with pytest.raises(InputError, match="new_tokens=1: give an integer of at least 2"):
        measure_speed(tiny_llama(), new_tokens=1)
    with pytest.raises(InputError, match="give positive batch sizes"):
        measure_speed(tiny_llama(), batches=(0,))


@pytest.fixture(scope="module")
def folders(pair: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    return shear.save(pair[0], root / "dense"), shear.save(pair[1], root / "pruned")


def _bench(folders: tuple[Path, Path], *extra: str) -> list[str]:
    return ["bench", str(folders[0]), str(folders[1]), "--batches", "1", "--prompt-tokens", "8", "--new-tokens", "3",
            "--repeats", "1", "--granularity", "8", "--threads", "1", *extra]  # fmt: skip


def test_bench_prints_the_table(folders: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_bench(folders)) == 0
    out = capsys.readouterr().out
    assert "dense tok/s" in out and "pruned tok/s" in out and "efficiency" in out
    lines = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines() if line.startswith(("prefill", "decode"))}
    assert set(lines) == {"prefill b1", "decode b1"} and all(line.rstrip().endswith(tuple("0123456789")) for line in lines.values())
    assert "mlp.down_proj in_features 67 (layers 0-1)" in out and "ideal speed-up" in out


def test_bench_gguf_without_llama_cpp_says_how_to_install(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails even where it is installed
    with pytest.raises(ModelLoadError, match="pip install llama-cpp-python"):
        require_llama_cpp()
    assert main(_bench(folders, "--gguf", str(tmp_path / "pruned.gguf"))) == 1
    err = capsys.readouterr().err
    assert "shear bench: error:" in err and "`pip install llama-cpp-python`" in err and "Traceback" not in err


class _FakeLlama:
    """Stands in for ``llama_cpp.Llama``: counts the tokens it evaluates."""

    evaluated: list[int] = []

    def __init__(self, model_path: str, n_ctx: int, n_batch: int, n_threads: int, verbose: bool) -> None:
        self.n_ctx, self.n_threads = n_ctx, n_threads

    def n_vocab(self) -> int:
        return 32

    def reset(self) -> None:
        pass

    def eval(self, tokens: list[int]) -> None:
        assert all(0 <= t < 32 for t in tokens)
        _FakeLlama.evaluated.append(len(tokens))


def test_bench_gguf_rows_through_the_binding(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=_FakeLlama))
    files = [tmp_path / "pruned.gguf", tmp_path / "dense.gguf"]
    for f in files:
        f.write_bytes(b"GGUF" + bytes(16))
    _FakeLlama.evaluated.clear()
    rates = gguf_speed(files[0], prompt_tokens=8, new_tokens=3, repeats=1, threads=1)
    assert sorted(rates) == ["llama.cpp generation b1", "llama.cpp prompt eval b1"] and min(rates.values()) > 0
    assert _FakeLlama.evaluated.count(8) == 4 and _FakeLlama.evaluated.count(1) == 6  # warm-up + 1 repeat each
    assert main(_bench(folders, "--gguf", str(files[0]))) == 0
    out = capsys.readouterr().out
    assert "llama.cpp prompt eval b1" in out and "dense: not measured: give the dense GGUF with --gguf-dense" in out
    assert main(_bench(folders, "--gguf", str(files[0]), "--gguf-dense", str(files[1]))) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("llama.cpp generation b1"))
    assert row.split()[-2].endswith("x")  # a speed-up: both files were timed
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(InputError, match="not a GGUF file"):
        check_gguf_file(tmp_path / "model.json")
    with pytest.raises(InputError, match="--gguf-dense .*: no such file"):
        check_gguf_file(tmp_path / "missing.gguf", "--gguf-dense")
