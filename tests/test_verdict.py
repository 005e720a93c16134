"""The quality verdict: measurements on held-out text, the judgement against its thresholds, and
``shear.compile(..., evaluate=...)`` putting it first in the report (tiny trained LLaMA, real corpus)."""

from __future__ import annotations

import copy
import doctest
import importlib
import math
import re
from pathlib import Path

import pytest
import torch

import shear
from shear.data import TextData, held_out, held_out_texts, read_validation_folder
from shear.errors import DataError, InputError
from shear.evaluation import (
    QualityResult,
    Thresholds,
    Verdict,
    check_comparable,
    eval_size,
    evaluate_model,
    perplexity_ids,
)
from shear.zoo import load_tiny_llama


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    model, tok, _, _ = load_tiny_llama()
    return model, tok


@pytest.mark.parametrize(
    "module",
    ["shear.evaluation.verdict", "shear.evaluation.quality", "shear.data.heldout", "shear.data.harness_tasks",
     "shear.report.verdict_html", "shear.evaluation.harness"],
)  # fmt: skip
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def _result(ppl: dict[str, float], acc: float | None = None, n: int = 40, chance: float = 0.25) -> QualityResult:
    tasks = {}
    if acc is not None:
        tasks["t"] = {"accuracy": acc, "accuracy_norm": acc, "n": n, "chance": chance,
                      "stderr": math.sqrt(acc * (1 - acc) / (n - 1)), "by": "shear"}  # fmt: skip
    return QualityResult("m", 100, "held", "quick", {s: {"ppl": p, "tokens": 255} for s, p in ppl.items()}, tasks)


def test_thresholds_and_the_perplexity_ratio() -> None:
    dense = _result({"a": 10.0, "b": 20.0})
    v = Verdict.from_pair(dense, _result({"a": 10.0, "b": 40.0}))
    assert v.ppl_ratios == {"a": 1.0, "b": 0.5}
    assert v.ppl_ratio == pytest.approx(math.sqrt(0.5))  # geometric mean: each source counts once
    assert v.judgement == "warn" and v.headline == "kept 70.7% of dense quality"
    assert Verdict.from_pair(dense, _result({"a": 10.5, "b": 21.0})).judgement == "good"
    assert Verdict.from_pair(dense, _result({"a": 20.0, "b": 40.0})).judgement == "bad"
    assert "bad: perplexity ratio 0.500 < 0.70" in Verdict.from_pair(dense, _result({"a": 20.0, "b": 40.0})).reason
    strict = Verdict.from_pair(dense, _result({"a": 10.5, "b": 21.0}), Thresholds(good=0.99, bad=0.9))
    assert strict.judgement == "warn" and "good >= 99%" in strict.format()
    for good, bad in [(0.5, 0.7), (1.2, 0.5), (0.9, 0.0)]:
        with pytest.raises(InputError, match="thresholds need 0 < bad <= good <= 1"):
            Thresholds(good=good, bad=bad)
    with pytest.raises(InputError, match="measured on different held-out text"):
        Verdict.from_pair(dense, _result({"a": 10.0}))


def test_accuracy_lowers_the_judgement_only_beyond_noise() -> None:
    dense = _result({"a": 10.0}, acc=0.8, n=400)
    collapsed = Verdict.from_pair(dense, _result({"a": 10.2}, acc=0.3, n=400))
    assert collapsed.accuracy_ratio == pytest.approx(0.375)
    assert collapsed.judgement == "bad" and "accuracy ratio 0.375" in collapsed.reason
    noisy = Verdict.from_pair(_result({"a": 10.0}, acc=0.8, n=8), _result({"a": 10.2}, acc=0.6, n=8))
    assert noisy.judgement == "good" and "within two standard errors) does not lower it" in noisy.reason  # 8 items: 0.6 vs 0.8 is noise
    chance = Verdict.from_pair(_result({"a": 10.0}, acc=0.27), _result({"a": 10.2}, acc=0.05))
    assert chance.judgement == "good" and "within noise of chance" in chance.reason
    d = collapsed.to_dict()
    assert d["judgement"] == "bad" and d["thresholds"]["good"] == 0.9 and d["after"]["tasks"]["t"]["accuracy"] == 0.3
    assert QualityResult.from_dict(d["before"]) == dense


def test_evaluate_model_on_the_tiny_llama(tiny) -> None:
    model, tok = tiny
    held = held_out(tok)
    assert held.origin == "the bundled corpus's validation split" and set(held.tasks) == {"define-word", "next-line-shakespeare"}
    r = evaluate_model(model, held)
    assert list(r.perplexity) == ["kjv", "shakespeare", "wordnet", "jargon", "pydocs"]
    own = perplexity_ids(model, held.texts["kjv"], window=256, stride=256, max_tokens=256)
    assert r.perplexity["kjv"]["ppl"] == pytest.approx(own.ppl) and r.perplexity["kjv"]["tokens"] == 255
    assert 10 < r.mean_ppl < 200 and r.tasks["define-word"]["n"] == 16 and len(r.generations) == 2
    assert all(g["text"] for g in r.generations) and not model.training
    same = Verdict.from_pair(r, evaluate_model(model, held))
    assert same.ppl_ratio == pytest.approx(1.0) and same.judgement == "good" and same.accuracy_ratio == 1.0
    worse = copy.deepcopy(model)
    with torch.no_grad():
        worse.model.layers[0].mlp.down_proj.weight.mul_(-3)
    v = Verdict.from_pair(r, evaluate_model(worse, held))
    assert v.ppl_ratio < 0.9 and v.judgement in ("warn", "bad")
    text = v.format()
    assert "quality verdict: " in text and "dense ppl" in text and "acc_norm" in text and "speed:" in text


def test_held_out_says_where_the_text_comes_from(tiny) -> None:
    _, tok = tiny
    own = TextData.from_texts(tok, {"mine": "In the beginning God created the heaven and the earth. " * 20},
                              {"mine": "And the earth was without form, and void. " * 20})  # fmt: skip
    assert own.held_out().origin == "the validation split of the data given (mine)"
    assert list(own.held_out().texts) == ["mine"]
    none = TextData.from_texts(tok, {"mine": "In the beginning God created the heaven and the earth. " * 20})
    assert none.held_out().origin == "the bundled corpus's validation split (the data given has none)"
    corpus = TextData.from_corpus(tok, max_train_chars=5_000, max_val_chars=3_000)
    assert corpus.held_out("full").origin == "the bundled corpus's validation split"
    assert len(corpus.held_out("full").tasks["next-line-kjv"]) == 50


def test_bad_held_out_input_names_the_fix(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    with pytest.raises(DataError, match="held-out source 'empty' .* is empty"):
        held_out_texts(tok, {"empty": ""}, origin="test")
    (tmp_path / "a.validation.txt").write_text("")
    (tmp_path / "a.txt").write_text("training text " * 50)
    with pytest.raises(DataError, match=r"a.validation.txt is empty .*put a few paragraphs"):
        read_validation_folder(tmp_path)
    (tmp_path / "a.validation.txt").unlink()
    with pytest.raises(DataError, match="no <source>.validation.txt files there"):
        read_validation_folder(tmp_path)
    with pytest.raises(DataError, match="evaluate_model needs held-out text"):
        evaluate_model(model, "some text")
    with pytest.raises(InputError, match="evaluation size 'huge' is not one of quick, full"):
        eval_size("huge")
    with pytest.raises(InputError, match="every count must be a positive integer"):
        type(eval_size("quick"))("mine", tokens=0, window=8, stride=8, tasks=(), prompts=0, new_tokens=1)


def test_check_comparable_refuses_another_architecture_or_vocabulary(tiny) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(InputError, match="the dense model is a gpt2 model with a 2,048-token vocabulary, the evaluated "
                                         "one a llama model with 2,048 tokens; .*pruned from"):  # fmt: skip
        check_comparable(gpt2, model)
    check_comparable(model, copy.deepcopy(model), dense_tokenizer=tok, tokenizer=tok)

    class Other:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0}

    with pytest.raises(InputError, match="tokenizers differ"):
        check_comparable(model, model, dense_tokenizer=tok, tokenizer=Other())


def test_compile_evaluates_and_reports_the_verdict_first(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    data = TextData.from_corpus(tok, max_train_chars=5_000, max_val_chars=3_000)
    path = tmp_path / "report.html"
    small = shear.compile(model, "random{ratio=0.2,seed=0},erase", data=data, evaluate=True, report=path)
    report = small.shear_report
    v = report.verdict
    assert isinstance(v, Verdict) and v.before.params > v.after.params == sum(p.numel() for p in small.parameters())
    assert v.before.held_out == "the bundled corpus's validation split" and v.ppl_ratio < 1
    assert "quality verdict: " in str(report) and report.to_dict()["verdict"]["judgement"] == v.judgement
    page = path.read_text()
    sections = re.findall(r'<section id="(\w+)">', page)
    assert sections[0] == "verdict" and "summary" in sections  # the speed section may come between
    verdict = re.search(r'<section id="verdict">(.*?)</section>', page, re.S).group(1)  # type: ignore[union-attr]
    assert f'class="badge {v.judgement}"' in verdict and v.headline in verdict and "good &gt;= 90%" in verdict
    assert "pruned ppl" in verdict and "define-word" in verdict and "What is the capital of France?" in verdict
    quality = re.search(r'<section id="quality">(.*?)</section>', page, re.S).group(1)  # type: ignore[union-attr]
    assert "not run" not in quality and "measured by the caller" not in page


def test_compile_without_text_data_skips_the_evaluation_and_says_why(tiny) -> None:
    model, _ = tiny
    ids = torch.arange(16).view(1, 16)
    small = shear.compile(model, "random{ratio=0.2,seed=0},erase", example_inputs=ids, evaluate="quick")
    assert small.shear_report.verdict is None
    assert any("evaluate: skipped, the quality verdict needs text data and got no data" in w
               for w in small.shear_report.warnings)  # fmt: skip
    assert "not run: quality was not measured" in shear.report.render(small.shear_report.details)
    with pytest.raises(InputError, match="evaluation size 'fast'"):
        shear.compile(model, "random{ratio=0.2,seed=0},erase", example_inputs=ids, evaluate="fast")
