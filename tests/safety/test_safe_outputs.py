"""Output folders: `ndino export` and `ndino assemble` never delete what they did not write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llava_ndino.cli import main
from llava_ndino.export.folders import MARKER, UnsafeOutputError, atomic_folder, check_output_folder


def _run_files(run: Path) -> set[str]:
    return {str(path.relative_to(run)) for path in run.rglob("*")}


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A folder standing for a run directory, with files whose loss the tests would notice."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "optimizer.pt").write_bytes(b"state")
    (run / "metrics.jsonl").write_text("{}\n")
    return run


@pytest.mark.parametrize("relative", [".", "checkpoints", "checkpoints/step_1", ".."])
def test_out_that_is_inside_or_contains_the_input_is_refused(fake_run: Path, relative: str) -> None:
    before = _run_files(fake_run)
    with pytest.raises(UnsafeOutputError, match="input"):
        check_output_folder(fake_run / relative, [fake_run])
    assert _run_files(fake_run) == before


def test_current_directory_home_and_repository_root_are_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeOutputError, match="current directory"):
        check_output_folder(Path("."))
    with pytest.raises(UnsafeOutputError, match="home directory"):
        check_output_folder(Path.home())
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(UnsafeOutputError, match="repository root"):
        check_output_folder(tmp_path / "repo", force=True)  # --force never reaches these


def test_foreign_non_empty_folder_needs_force_and_then_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UnsafeOutputError, match="--force"), atomic_folder(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "thesis.tex").read_text() == "years of work"
    with atomic_folder(out, force=True) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "weights"])


def test_earlier_export_is_replaced_without_force_and_a_failed_write_keeps_it(tmp_path: Path) -> None:
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("first")
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_text("second")
    assert (out / "weights").read_text() == "second"
    with pytest.raises(RuntimeError, match="disk died"), atomic_folder(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk died")
    assert (out / "weights").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp or old folder left behind


def test_cli_export_onto_its_own_run_keeps_the_run(tiny_llava_dir: Path, tmp_path: Path, capsys) -> None:
    """`ndino export RUN --out RUN` once deleted the run and exited 0."""
    source = tmp_path / "model"
    os.symlink(tiny_llava_dir, source)  # an input we must not touch
    before = _run_files(tiny_llava_dir)
    for out in (source, tiny_llava_dir, tiny_llava_dir.parent):
        assert main(["export", str(source), "--out", str(out)]) == 2
        assert "input" in capsys.readouterr().err
    assert _run_files(tiny_llava_dir) == before


def test_cli_assemble_refuses_to_overwrite_its_language_model(tiny_dirs: dict[str, Path], capsys) -> None:
    before = _run_files(tiny_dirs["llm"])
    code = main(
        [
            "assemble",
            "--vision",
            str(tiny_dirs["vision"]),
            "--llm",
            str(tiny_dirs["llm"]),
            "--out",
            str(tiny_dirs["llm"]),
        ]
    )
    assert code == 2 and "is the input" in capsys.readouterr().err
    assert _run_files(tiny_dirs["llm"]) == before
