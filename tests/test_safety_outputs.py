"""The output guard (shear.io.outputs) on every path shear writes, as a user and an attacker meet it.

Each test builds its own folders, hashes the user's tree before and after, and checks that every
refusal is an OutputError (a ShearError) naming the path and the fix: no output inside or equal to
an input (``--report``, ``draw -o``, ``-o``, ``--dump-dir``), no file shear did not write replaced
without ``--overwrite``, the final rename re-checked (a file put into the empty ``-o`` folder while
saving survives; two saves to one new path do not replace each other), leftovers of killed runs
cleaned, write errors (disk full) reported with the old output untouched, ordinary file modes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import shear
import shear.io.outputs as files
from shear.cli import main
from shear.errors import OutputError, ShearError
from shear.zoo import TINY_LLAMA_DIR

PRUNE = "random{ratio=0.3,seed=0},erase"


def _hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (and the names of its folders): the user's tree."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _model_copy(tmp_path: Path, name: str = "model") -> Path:
    """A user's model folder: a copy of the shipped tiny LLaMA."""
    model = tmp_path / name
    shutil.copytree(TINY_LLAMA_DIR, model)
    return model


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Tokenizer:
    """Stands in for a tokenizer: ``save_pretrained`` runs ``action`` while shear is saving."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def save_pretrained(self, folder: str) -> None:
        self.action(Path(folder))


@pytest.fixture
def no_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pruning work fails the test: output checks must come first."""

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("pruning started before the outputs were checked")

    monkeypatch.setattr(shear, "compile", boom)


# --- never inside an input ---------------------------------------------------------------------


def test_report_into_the_input_is_refused_even_with_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None
) -> None:
    model = _model_copy(tmp_path)
    before = _hashes(model)
    args = ["prune", str(model), "--passes", PRUNE, "--data", "none", "-o", str(tmp_path / "out")]
    assert main([*args, "--report", str(model / "config.json"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "--report" in err and "inside the input" in err and "write outside it" in err
    assert _hashes(model) == before and not (tmp_path / "out").exists()


def test_draw_into_the_input_is_refused_even_with_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model_copy(tmp_path)
    before = _hashes(model)
    assert main(["draw", str(model), "-o", str(model / "config.json"), "--overwrite"]) == 1
    assert "inside the input" in capsys.readouterr().err
    assert main(["draw", str(model), "-o", str(model / "groups.svg")]) == 1
    assert "inside the input" in capsys.readouterr().err
    assert _hashes(model) == before


def test_output_and_dumps_inside_the_input_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None
) -> None:
    saved = _model_copy(tmp_path, "saved")
    before = _hashes(saved)
    base = ["prune", str(saved), "--passes", PRUNE, "--data", "none"]
    assert main([*base, "-o", str(saved / "pruned")]) == 1
    assert "inside the input" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "out"), "--dump-dir", str(saved)]) == 1
    assert "is the input" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "out"), "--dump-dir", str(saved / "ir"), "--overwrite"]) == 1
    assert "inside the input" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "out"), "--dump-dir", str(tmp_path / "out" / "ir")]) == 1
    assert "inside the output" in capsys.readouterr().err
    assert _hashes(saved) == before and sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


def test_export_into_the_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model_copy(tmp_path)
    before = _hashes(model)
    assert main(["export", str(model), "-o", str(model / "model.gguf"), "--force"]) == 1
    assert "inside the input" in capsys.readouterr().err
    assert _hashes(model) == before


# --- report paths checked before any work ------------------------------------------------------


def test_report_path_that_is_a_folder_or_a_link_is_refused_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None
) -> None:
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    before = _hashes(folder)
    args = ["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", "none", "-o", str(tmp_path / "out")]
    assert main([*args, "--report", str(folder)]) == 1
    assert "is a directory; give a file name" in capsys.readouterr().err
    link = tmp_path / "report.html"
    link.symlink_to(tmp_path / "nowhere.html")
    assert main([*args, "--report", str(link), "--overwrite"]) == 1
    assert "symbolic link that points nowhere" in capsys.readouterr().err
    assert _hashes(folder) == before and not (tmp_path / "nowhere.html").exists()


# --- --dump-dir --------------------------------------------------------------------------------


def test_dump_dir_never_overwrites_user_files_without_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "pipeline.txt").write_text("my pipeline notes")
    (dumps / "01-discover-groups.svg").write_text("<svg>my drawing</svg>")
    before = _hashes(dumps)
    args = ["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", "none", "--no-report"]
    assert main([*args, "-o", str(tmp_path / "a"), "--dump-dir", str(dumps)]) == 1
    err = capsys.readouterr().err
    assert "shear did not write there" in err and "--overwrite" in err
    assert _hashes(dumps) == before and not (tmp_path / "a").exists()
    # through the Python API too
    with pytest.raises(OutputError, match="shear did not write there"):
        shear.compile(_Net(), "random{ratio=0.3,seed=0}", example_inputs=torch.randn(2, 4), dump_dir=dumps)
    assert _hashes(dumps) == before


def test_dump_dir_of_shear_is_reused_and_overwrite_replaces_same_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dumps = tmp_path / "dumps"
    args = ["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", "none", "--no-report"]
    assert main([*args, "-o", str(tmp_path / "a"), "--dump-dir", str(dumps)]) == 0
    assert (dumps / "pipeline.txt").is_file() and (dumps / files.RECORD).is_file()
    assert main([*args, "-o", str(tmp_path / "b"), "--dump-dir", str(dumps)]) == 0  # shear's own: reused
    (dumps / "pipeline.txt").write_text("edited by me")  # no longer what shear wrote
    (dumps / "keep.txt").write_text("mine")
    assert main([*args, "-o", str(tmp_path / "c"), "--dump-dir", str(dumps)]) == 1
    assert "holds 2 file(s) shear did not write there (keep.txt, pipeline.txt)" in capsys.readouterr().err
    assert (dumps / "pipeline.txt").read_text() == "edited by me"
    assert main([*args, "-o", str(tmp_path / "c"), "--dump-dir", str(dumps), "--overwrite"]) == 0
    assert (dumps / "pipeline.txt").read_text() != "edited by me" and (dumps / "keep.txt").read_text() == "mine"


def test_figures_never_replace_a_file_shear_did_not_write(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from shear.figures import save_figure

    mine = tmp_path / "fig.png"
    mine.write_bytes(b"my picture")
    fig = plt.figure()
    with pytest.raises(OutputError, match=r"fig\.png exists and shear did not write it"):
        save_figure(fig, tmp_path / "fig")
    assert mine.read_bytes() == b"my picture"
    paths = save_figure(fig, tmp_path / "new" / "fig")
    assert save_figure(fig, tmp_path / "new" / "fig") == paths  # its own files: replaced
    plt.close(fig)


# --- the final rename is re-checked ------------------------------------------------------------


def test_a_file_put_into_the_empty_output_while_saving_survives(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def user_writes(_folder: Path) -> None:
        (out / "notes.txt").write_text("written while shear was saving")

    with pytest.raises(OutputError, match=r"out changed while shear was writing it .*nothing there was replaced"):
        shear.save(_Net(), out, tokenizer=_Tokenizer(user_writes))
    assert _hashes(out) == {"notes.txt": hashlib.sha256(b"written while shear was saving").hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing hidden left


def test_two_saves_to_one_new_path_do_not_replace_each_other(tmp_path: Path) -> None:
    out = tmp_path / "out"
    inner = _Net()
    with torch.no_grad():
        inner.fc.weight.fill_(2.0)

    def other_save(_folder: Path) -> None:
        shear.save(inner, out)  # a second save to the same new path finishes first

    with pytest.raises(OutputError, match="absent when checked, a folder of .* entries now"):
        shear.save(_Net(), out, tokenizer=_Tokenizer(other_save))
    assert torch.equal(shear.load(out, model=_Net()).fc.weight, inner.fc.weight)

    def other_overwrite(_folder: Path) -> None:
        shear.save(inner, out, overwrite=True)  # replaces the folder the first save checked

    with pytest.raises(OutputError, match=r"changed while shear was writing it \(a folder of \d+ entries when checked"):
        shear.save(_Net(), out, tokenizer=_Tokenizer(other_overwrite), overwrite=True)  # overwrite: of what was checked
    assert torch.equal(shear.load(out, model=_Net()).fc.weight, inner.fc.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_exchanges_only_the_folder_that_was_checked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shear.save(_Net(), out)

    def user_edits(_folder: Path) -> None:
        (out / "notes.txt").write_text("added after the check")

    before_edit = _hashes(out)
    with pytest.raises(OutputError, match="changed while shear was writing it"):
        shear.save(_Net(), out, overwrite=True, tokenizer=_Tokenizer(user_edits))
    assert _hashes(out) == {**before_edit, "notes.txt": hashlib.sha256(b"added after the check").hexdigest()}
    shear.save(_Net(), out, overwrite=True)  # checked as it is now: replaced
    assert not (out / "notes.txt").exists()


def test_renameat2_noreplace_claims_new_paths_and_the_fallback_checks_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine")
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(OutputError, match="absent when checked, a file now"):
        files._claim(src, taken)
    monkeypatch.setattr(files, "_renameat2", lambda a, b, flags: False)  # no renameat2: check, then rename
    with pytest.raises(OutputError, match="absent when checked, a file now"):
        files._claim(src, taken)
    assert taken.read_text() == "mine" and src.is_dir()
    files._claim(src, tmp_path / "new")
    assert (tmp_path / "new").is_dir() and not src.exists()


# --- leftovers of killed runs ------------------------------------------------------------------


def test_a_killed_save_leaves_a_sibling_the_next_run_removes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from shear.io.outputs import atomic_dir
        with atomic_dir(Path({str(out)!r})) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.tmp-")
    mystery = tmp_path / ".out.tmp-mine"  # not provably shear's: reported, kept
    mystery.mkdir()
    (mystery / "data").write_text("mine")
    with pytest.warns(UserWarning, match=r"cannot prove are its own \(\.out\.tmp-mine\)"):
        files.check_output_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-mine"]
    assert (mystery / "data").read_text() == "mine"


def test_a_dangling_symlink_output_is_refused_up_front(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None) -> None:
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert main(["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "-o", str(link)]) == 1
    assert "symbolic link that points nowhere" in capsys.readouterr().err
    with pytest.raises(OutputError, match="symbolic link that points nowhere"):
        shear.save(_Net(), link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"] and link.is_symlink()


# --- write errors, checkpoint folders, caches --------------------------------------------------


def test_disk_full_mid_save_is_an_output_error_and_the_old_folder_is_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shear.save(_Net(), out)
    before = _hashes(out)

    def disk_full(folder: Path) -> None:
        (folder / "tokenizer.json").write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "tokenizer.json"))

    with pytest.raises(OutputError, match=r"cannot write .*out: .*the disk is full.*previous content of .*out is untouched"):
        shear.save(_Net(), out, overwrite=True, tokenizer=_Tokenizer(disk_full))
    assert _hashes(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OutputError, match=r"nothing was written at .*new"):
        shear.save(_Net(), tmp_path / "new", tokenizer=_Tokenizer(disk_full))
    assert not (tmp_path / "new").exists()


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    from shear.training import TokenBatches, TrainConfig, TrainHook, train
    from shear.zoo import load_tiny_llama

    class _NoStep(TrainHook):
        def after_optimizer_step(self, state: Any) -> None:
            raise AssertionError("training ran before checkpoint_dir was checked")

    ckpt = tmp_path / "ckpt"
    ckpt.write_text("my file")
    model = load_tiny_llama().model
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=8, checkpoint_dir=str(ckpt), checkpoint_every=1)
    tokens = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OutputError, match=r"checkpoint_dir .*ckpt is a file, not a folder; give a new folder"):
        train(model, TokenBatches.from_config({"a": tokens}, cfg), cfg, hooks=[_NoStep()])
    assert ckpt.read_text() == "my file"


def test_knowledge_cache_in_a_file_is_an_output_error(tmp_path: Path) -> None:
    from shear.passes.lorashear.knowledge import KnowledgeDistribution
    from shear.passes.lorashear.knowledge_cache import save_result

    blocker = tmp_path / "cache"
    blocker.write_text("mine")
    kd = KnowledgeDistribution(10.0, {"a": 10.0}, (), (), frozenset(), frozenset(), 0.5, 0.1, "random")
    with pytest.raises(OutputError, match=r"cannot write .*cache/knowledge-x\.json"):
        save_result(blocker / "knowledge-x.json", kd)
    assert blocker.read_text() == "mine"


# --- file modes --------------------------------------------------------------------------------


def test_saved_files_have_the_modes_of_a_plain_write(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = shear.save(_Net(), tmp_path / "out")
        report = files.check_output_file(tmp_path / "report.html")
        with files.atomic_file(report) as tmp:
            tmp.write_text("<html></html>")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*"), report]}
    assert modes["out"] == 0o755
    assert {m for n, m in modes.items() if n != "out"} == {0o644}, modes
    assert "model.safetensors" in modes


def test_every_refusal_is_a_shear_error(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    for call, match in (
        (lambda: files.check_output_dir(f), "is an existing file; a model is saved as a directory"),
        (lambda: files.check_output_file(tmp_path), "is a directory; give a file name"),
        (lambda: files.check_writable_dir(f), "is an existing file; give a directory"),
        (lambda: files.check_output_file(f / "x", inputs=[f]), "is inside the input"),
    ):
        with pytest.raises(ShearError, match=match):
            call()


# --- review fixes: leftovers in a dump folder, removed outputs, compile's report, overwrite given explicitly


def test_a_killed_dump_write_does_not_refuse_the_next_run(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    files.write_owned(dumps, "pipeline.txt", "shear's\n")
    script = textwrap.dedent(
        f"""
        import os, signal
        from shear.io.outputs import owned_file
        with owned_file({str(dumps)!r}, "pipeline.txt") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9
    assert [p.name for p in dumps.glob(".pipeline.txt.tmp-*")]  # the killed write's hidden folder
    mystery = dumps / ".notes.tmp-mine"  # not provably shear's: reported, kept, and not a reason to refuse
    mystery.mkdir()
    with pytest.warns(UserWarning, match=r"cannot prove are its own \(\.notes\.tmp-mine\)"):
        assert files.check_writable_dir(dumps) == dumps
    assert sorted(p.name for p in dumps.iterdir()) == [".notes.tmp-mine", "pipeline.txt", files.RECORD]
    assert (dumps / "pipeline.txt").read_text() == "shear's\n"


def test_an_output_removed_while_writing_is_claimed_not_discarded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shear.save(_Net(), out)
    new = _Net()
    with torch.no_grad():
        new.fc.weight.fill_(3.0)
    shear.save(new, out, overwrite=True, tokenizer=_Tokenizer(lambda _folder: shutil.rmtree(out)))
    assert torch.equal(shear.load(out, model=_Net()).fc.weight, new.fc.weight)
    report = tmp_path / "report.html"
    report.write_text("old")
    checked = files.check_output_file(report, overwrite=True)
    with files.atomic_file(checked) as tmp:
        report.unlink()  # removed by someone else meanwhile
        tmp.write_text("new")
    assert report.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.html"]


def test_compile_refuses_an_existing_report_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shear.passes.manager import PassManager

    mine = tmp_path / "report.html"
    mine.write_text("my report")
    run = PassManager.run

    def no_run(*_a: object, **_k: object) -> None:
        raise AssertionError("the pipeline ran before the report path was checked")

    monkeypatch.setattr(PassManager, "run", no_run)
    for report, match in (
        (mine, r"output file .*report\.html exists; pass overwrite=True \(--overwrite\)"),
        (tmp_path, "is a directory; give a file name"),
    ):
        with pytest.raises(OutputError, match=match):
            shear.compile(_Net(), "random{ratio=0.3,seed=0}", example_inputs=torch.randn(2, 4), report=report)
    assert mine.read_text() == "my report"
    monkeypatch.setattr(PassManager, "run", run)
    shear.compile(_Net(), "random{ratio=0.3,seed=0}", example_inputs=torch.randn(2, 4), report=mine, overwrite=True)
    assert mine.read_text().startswith("<!DOCTYPE html>")


def test_overwrite_is_given_to_each_write_never_remembered(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    (dumps / "notes.txt").write_text("mine")
    files.check_writable_dir(dumps, overwrite=True)  # a check with overwrite grants nothing to later writes
    (dumps / "pipeline.txt").write_text("added after the check")
    with pytest.raises(OutputError, match=r"pipeline\.txt exists and shear did not write it; nothing was replaced"):
        files.write_owned(dumps, "pipeline.txt", "shear's\n")
    assert (dumps / "pipeline.txt").read_text() == "added after the check"
    with pytest.raises(OutputError, match="holds 2 file"):
        shear.compile(_Net(), "random{ratio=0.3,seed=0}", example_inputs=torch.randn(2, 4), dump_dir=dumps)
    shear.compile(_Net(), "random{ratio=0.3,seed=0}", example_inputs=torch.randn(2, 4), dump_dir=dumps, overwrite=True)
    assert (dumps / "pipeline.txt").read_text() != "added after the check" and (dumps / "notes.txt").read_text() == "mine"


def test_a_parent_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("mine")
    for call, match in (
        (lambda: files.check_output_file(f / "report.html"), r"output file .*f/report\.html is inside .*f, which is a file"),
        (lambda: files.check_output_dir(f / "model"), r"output path .*f/model is inside .*f, which is a file"),
        (lambda: files.check_writable_dir(f / "dumps"), r"folder .*f/dumps is inside .*f, which is a file"),
        (lambda: files.check_parent(f, "checkpoint_dir", inside=True), r"checkpoint_dir .*f is a file, not a folder; give a new folder"),
    ):
        with pytest.raises(OutputError, match=match):
            call()
    assert f.read_text() == "mine"


def test_write_errors_and_unreadable_files_are_output_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dumps = tmp_path / "dumps"
    files.write_owned(dumps, "pipeline.txt", "shear's\n")
    real = files.sha256_file

    def unreadable(path: Path) -> str:
        if path.name == "pipeline.txt":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(files, "sha256_file", unreadable)
    with pytest.raises(OutputError, match=r"holds 1 file\(s\) shear did not write there \(pipeline\.txt\)"):
        files.check_writable_dir(dumps)
    with pytest.raises(OutputError, match=r"pipeline\.txt exists and shear did not write it"):
        files.write_owned(dumps, "pipeline.txt", "again\n")
    monkeypatch.setattr(files, "_MARK", "missing/.shear-partial")  # the marker cannot be written
    with pytest.raises(OutputError, match=r"cannot write .*new\.txt: .*nothing was written at"):
        files.write_owned(dumps, "new.txt", "x")
    assert sorted(p.name for p in dumps.iterdir()) == ["pipeline.txt", files.RECORD]


def test_a_special_file_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    fifo = tmp_path / "report.html"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match=r"report\.html is a special file \(a FIFO, a socket or a device\), not a regular file"):
        files.check_output_file(fifo, overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_dump_dir_and_output_in_each_other_are_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pruning: None
) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    base = ["prune", str(TINY_LLAMA_DIR), "--passes", PRUNE, "--data", "none", "--overwrite"]
    for output, dump, says in (
        (dumps, dumps, "--dump-dir .*dumps is the output .*dumps, which the save replaces"),
        (tmp_path, dumps, "--dump-dir .*dumps is inside the output"),
        (dumps / "model", dumps, "-o .*model is inside the --dump-dir .*dumps, where shear adds its IR dumps"),
    ):
        assert main([*base, "-o", str(output), "--dump-dir", str(dump)]) == 1
        err = capsys.readouterr().err
        assert re.search(says, err) and "input" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps"] and not any(dumps.iterdir())


def test_owned_file_and_atomic_writes_refuse_what_they_cannot_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "f"
    f.write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    for folder, name, match in (
        (tmp_path, "../x", r"cannot write a file named '\.\./x' there; use a plain file name"),
        (tmp_path, files.RECORD, r"cannot write a file named 'shear-files\.json' there"),
        (tmp_path, ".hidden", r"cannot write a file named '\.hidden' there"),
        (f, "x", r"f is not a folder \(a file or a symbolic link\); give a folder to write x into"),
        (link, "x", r"link is not a folder \(a file or a symbolic link\)"),
    ):
        with pytest.raises(OutputError, match=match), files.owned_file(folder, name):
            pass
    with pytest.raises(OutputError, match=r"new\.txt: the writer produced no file; nothing was written"):
        with files.atomic_file(tmp_path / "new.txt"):
            pass
    with pytest.raises(OutputError, match=r"f is a file; it cannot be replaced by a folder"), files.atomic_dir(f) as tmp:
        (tmp / "x").write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a").write_text("mine")
    with pytest.raises(OutputError, match=r"folder is a folder of 1 entry; it cannot be replaced by a file"):
        with files.atomic_file(folder) as tmp:
            tmp.write_text("x")
    assert f.read_text() == "mine" and (folder / "a").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "folder", "link"]

    real = files._exchange

    def racing(a: Path, b: Path) -> bool:  # someone writes into the checked folder just before the swap
        if not (folder / "late.txt").exists():
            (folder / "late.txt").write_text("late")
        return real(a, b)

    monkeypatch.setattr(files, "_exchange", racing)
    files.check_output_dir(folder, overwrite=True)
    raced = r"folder changed while shear was writing it \(a folder of 1 entry when checked, a folder of 2 entries now\)"
    with pytest.raises(OutputError, match=raced), files.atomic_dir(folder) as tmp:
        (tmp / "b").write_text("new")
    assert _hashes(folder) == {"a": hashlib.sha256(b"mine").hexdigest(), "late.txt": hashlib.sha256(b"late").hexdigest()}
