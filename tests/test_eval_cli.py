"""``shear eval`` on saved folders and ``shear prune``'s default verdict (tiny trained LLaMA, real corpus)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import shear
from shear.cli import main
from shear.zoo import TINY_LLAMA_DIR, load_tiny_llama

LM_EVAL_SKIP = "needs lm-evaluation-harness: pip install lm_eval (or pip install -e '.[eval]')"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny LLaMA pruned 20% at random, saved as a shear folder and in the default (auto) format,
    the folder a user hands to ``shear export`` for GGUF."""
    model, tok, _, _ = load_tiny_llama()
    small = shear.compile(model, "random{ratio=0.2,seed=0},erase")
    root = tmp_path_factory.mktemp("eval")
    return {t: shear.save(small, root / t, tokenizer=tok, target=t) for t in ("shear", "auto")}


def test_eval_of_a_plain_hf_folder_prints_the_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(TINY_LLAMA_DIR)]) == 0
    out = capsys.readouterr().out
    assert "held-out: the bundled corpus's validation split (quick)" in out
    assert re.search(r"kjv\s+255\s+\d+\.\d\d", out) and "define-word" in out and "acc_norm" in out
    assert "'What is the capital of France?' -> " in out and "quality verdict" not in out


@pytest.mark.parametrize("fmt", ["shear", "auto"])
def test_eval_against_the_dense_folder_prints_the_verdict(
    fmt: str, pruned_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    if fmt == "shear":
        assert (pruned_dirs[fmt] / "shear.json").is_file()
    assert main(["eval", str(pruned_dirs[fmt]), "--against", str(TINY_LLAMA_DIR)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"quality verdict: (GOOD|WARN|BAD), kept (\d+\.\d)% of dense quality", out)
    assert m and float(m.group(2)) < 100, out
    assert "thresholds: good >= 90%, warn 70%-90%, bad < 70%" in out and "dense ppl" in out and "pruned ppl" in out
    assert "parameters: 1,049,728 -> " in out and "speed" in out


def test_eval_with_own_validation_files_and_an_empty_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "verses.validation.txt").write_text("In the beginning God created the heaven and the earth.\n" * 30)
    assert main(["eval", str(TINY_LLAMA_DIR), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"held-out: the validation files of {data} (quick)" in out and re.search(r"verses\s+255", out)
    (data / "empty.validation.txt").write_text("\n")
    assert main(["eval", str(TINY_LLAMA_DIR), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "empty.validation.txt is empty (the validation split of 'empty'); put a few paragraphs" in err


def test_eval_against_another_architecture_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(other)
    assert main(["eval", str(TINY_LLAMA_DIR), "--against", str(other)]) == 1
    err = capsys.readouterr().err
    assert "--against: the dense model is a gpt2 model with a 96-token vocabulary, the evaluated one a llama model " \
           "with 2,048 tokens" in err and "pass that model's folder to --against" in err  # fmt: skip


def test_tasks_without_lm_eval_say_how_to_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", str(TINY_LLAMA_DIR), "--tasks", "shear_define_word"]) == 1
    assert "runs lm-evaluation-harness, which is not installed: pip install lm_eval" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_LM_EVAL, reason=LM_EVAL_SKIP)
def test_unknown_bundled_task_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(TINY_LLAMA_DIR), "--tasks", "shear_define_words"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'shear_define_words': shear's bundled tasks are shear_define_word, " in err
    assert "`lm-eval ls tasks` lists the harness's own" in err


@pytest.mark.skipif(not HAS_LM_EVAL, reason=LM_EVAL_SKIP)
def test_a_bundled_task_runs_through_lm_eval(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """lm-eval's acc on shear's task equals shear's own scorer on the same items (same requests)."""
    from shear.data import define_word_task
    from shear.evaluation import score_choices

    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(tmp_path))):
        monkeypatch.setenv(var, value)
    assert main(["eval", str(TINY_LLAMA_DIR), "--tasks", "shear_define_word", "--limit", "12"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"shear_define_word\s+12\s+(\d\.\d{3})\s+(\d\.\d{3})\s+lm-eval", out)
    assert m, out
    model, tok, _, _ = load_tiny_llama()
    own = score_choices(model, tok, define_word_task("test", n=16)[:12])
    assert float(m.group(1)) == pytest.approx(own.accuracy, abs=1e-3)
    assert float(m.group(2)) == pytest.approx(own.accuracy_norm, abs=1e-3)
    assert "acc_norm: that sum divided by the option's length" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LM_EVAL, reason=LM_EVAL_SKIP)
def test_unknown_harness_task_name(capsys: pytest.CaptureFixture[str]) -> None:
    """Checked against the harness's whole index (seconds to build), before any model runs."""
    assert main(["eval", str(TINY_LLAMA_DIR), "--tasks", "hellaswagg"]) == 1
    err = capsys.readouterr().err
    assert "lm-eval does not know the task 'hellaswagg' (did you mean hellaswag" in err and "lm-eval ls tasks" in err


def test_prune_prints_and_reports_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "pruned"
    args = ["prune", str(TINY_LLAMA_DIR), "--passes", "random{ratio=0.2,seed=0},erase", "--data", "corpus"]
    assert main([*args, "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    verdict, saved = out.find("quality verdict: "), out.find(str(out_dir))
    assert 0 <= verdict < saved, out  # printed after the run, before the save
    page = (out_dir / "report.html").read_text()
    assert re.findall(r'<section id="(\w+)">', page)[0] == "verdict" and 'class="badge ' in page
    assert main([*args, "-o", str(tmp_path / "quiet"), "--no-eval"]) == 0
    assert "quality verdict" not in capsys.readouterr().out
    assert "not run: quality was not measured" in (tmp_path / "quiet" / "report.html").read_text()
