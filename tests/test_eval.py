"""shear.evaluation: sliding-window perplexity, multiple-choice scoring, generation."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from model_fixtures import load_smollm2_once
from transformers import LlamaConfig, LlamaForCausalLM

from shear.data import MultipleChoice, define_word_task
from shear.errors import DataError, ModelLoadError
from shear.evaluation import (
    evaluate_perplexity,
    forward_tokens,
    greedy_generate,
    lm_eval_harness,
    option_logprobs,
    perplexity,
    score_choices,
    sliding_windows,
)


class CharTokenizer:
    """Bytes as token ids: enough of the transformers tokenizer interface for evaluation."""

    pad_token_id = 0
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _full_nll(model: LlamaForCausalLM, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))


@pytest.mark.parametrize(("window", "stride"), [(w, s) for w in (2, 3, 5, 8) for s in range(1, w + 1)])
def test_sliding_windows_score_every_token_once_with_context(window: int, stride: int) -> None:
    for n in range(2, 40):
        windows = sliding_windows(n, window, stride)
        assert [t for _, e, f in windows for t in range(f, e)] == list(range(1, n))
        assert all(b < f < e and e - b <= window for b, e, f in windows)
        assert forward_tokens(n, window, stride) == sum(e - b for b, e, _ in windows)


def test_sliding_windows_reject_bad_arguments() -> None:
    for window, stride in [(1, 1), (4, 0), (4, 5)]:
        with pytest.raises(DataError, match="sliding window needs"):
            sliding_windows(10, window, stride)


def test_perplexity_with_one_window_equals_full_forward(tiny: LlamaForCausalLM) -> None:
    text = "In the beginning God created the heaven and the earth."
    ids = CharTokenizer()(text)["input_ids"]
    result = perplexity(tiny, CharTokenizer(), text, window=128, stride=64)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(_full_nll(tiny, ids), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll / result.tokens))


def test_perplexity_sliding_matches_manual_windows_and_batching(tiny: LlamaForCausalLM) -> None:
    text = "And the earth was without form, and void; and darkness was upon the face of the deep. " * 3
    ids = CharTokenizer()(text)["input_ids"]
    manual = 0.0
    for b, e, f in sliding_windows(len(ids), 32, 12):
        with torch.no_grad():
            logits = tiny(input_ids=torch.tensor([ids[b:e]])).logits[0]
        manual += float(
            torch.nn.functional.cross_entropy(
                logits[f - 1 - b : e - 1 - b], torch.tensor(ids[f:e]), reduction="sum"
            )
        )
    one = perplexity(tiny, CharTokenizer(), text, window=32, stride=12, batch_size=1)
    many = perplexity(tiny, CharTokenizer(), text, window=32, stride=12, batch_size=4)
    assert one.nll == pytest.approx(manual, rel=1e-5)
    assert many.nll == pytest.approx(manual, rel=1e-4)
    assert one.forward_tokens == forward_tokens(len(ids), 32, 12)
    capped = perplexity(tiny, CharTokenizer(), text, window=32, stride=32, max_tokens=50)
    assert capped.tokens == 49


def test_perplexity_errors_name_the_fix(tiny: LlamaForCausalLM) -> None:
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(tiny, CharTokenizer(), "a", name="tiny")
    with pytest.raises(DataError, match="got no texts"):
        evaluate_perplexity(tiny, CharTokenizer(), {})


def test_evaluate_perplexity_report_averages(tiny: LlamaForCausalLM) -> None:
    texts = {
        "a": "the quick brown fox jumps over the lazy dog",
        "b": "to be or not to be, that is the question",
    }
    seen: list[int] = []
    report = evaluate_perplexity(tiny, CharTokenizer(), texts, window=16, stride=8, progress=seen.append)
    assert list(report.results) == ["a", "b"]
    assert report.mean_ppl == pytest.approx((report.results["a"].ppl + report.results["b"].ppl) / 2)
    nll = sum(r.nll for r in report.results.values())
    assert report.pooled_ppl == pytest.approx(math.exp(nll / sum(r.tokens for r in report.results.values())))
    assert sum(seen) == sum(r.forward_tokens for r in report.results.values())
    assert (
        "mean" in report.table() and report.as_dict()["sources"]["a"]["tokens"] == report.results["a"].tokens
    )
    assert not tiny.training


def test_option_logprobs_match_unpadded_scoring(tiny: LlamaForCausalLM) -> None:
    item = MultipleChoice("Thou shalt not", (" kill.", " steal from thy neighbour.", " x"), 0, "toy")
    scores = option_logprobs(tiny, CharTokenizer(), item)
    ctx = CharTokenizer()(item.context)["input_ids"]
    for score, option in zip(scores, item.options, strict=True):
        opt = CharTokenizer()(option)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([ctx + opt])).logits[0], dim=-1)
        manual = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(opt))
        assert score == pytest.approx(manual, abs=1e-4)


def test_score_choices_accuracy(tiny: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    items = [MultipleChoice("c", ("a", "bb", "c"), k, "toy") for k in (0, 1, 2, 0)]
    import shear.evaluation.choice as choice

    monkeypatch.setattr(choice, "option_logprobs", lambda m, t, item: [-1.0, -1.5, -9.0])
    result = score_choices(tiny, CharTokenizer(), items)
    assert result.predictions == (0, 0, 0, 0)
    assert result.accuracy == 0.5 and result.chance == pytest.approx(1 / 3)
    assert result.accuracy_norm == 0.25  # per character, "bb" (-0.75) beats "a" (-1.0)
    with pytest.raises(DataError, match="got no items"):
        score_choices(tiny, CharTokenizer(), [])


def test_lm_eval_missing_gives_install_hint(tiny: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    with pytest.raises(ModelLoadError, match="pip install lm_eval"):
        lm_eval_harness(tiny, CharTokenizer(), ["hellaswag"])


# --- on SmolLM2 ------------------------------------------------------------------------------


@pytest.mark.models
def test_smollm2_beats_chance_on_define_word(tmp_path_factory: pytest.TempPathFactory) -> None:
    (model, tokenizer, _, _), _, _ = load_smollm2_once(tmp_path_factory)
    result = score_choices(model, tokenizer, define_word_task("validation", n=20))
    assert result.n == 20 and result.chance == 0.25
    # measured 0.55 raw / 0.65 length-normalised (chance 0.25); margins allow a couple of flips
    assert result.accuracy >= 0.35 and result.accuracy_norm >= 0.45, result


@pytest.mark.models
def test_smollm2_greedy_generation(tmp_path_factory: pytest.TempPathFactory) -> None:
    (model, tokenizer, _, _), _, _ = load_smollm2_once(tmp_path_factory)
    answer = greedy_generate(model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert "Paris" in answer
    assert answer == greedy_generate(
        model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=12
    )


def test_evaluation_uses_no_grad_state(tiny: LlamaForCausalLM) -> None:
    tiny.train()
    perplexity(tiny, CharTokenizer(), "abcdef", window=4, stride=2)
    assert tiny.training
    tiny.eval()
