"""Run directories (``formats.run_dir``): the latest complete checkpoint, with fall-backs past broken
ones, and resume= resolved from 'auto', 'none', a run or a checkpoint, with errors that name the path."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from llava_ndino.formats.run_dir import CheckpointError, latest_checkpoint, resolve_resume
from tests.helpers import save_tiny_checkpoint


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path: Path, caplog) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_tiny_checkpoint(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == root / "step_3"

    shutil.rmtree(root / "step_3")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == root / "step_2"
    assert "step_3" in caplog.text and "falling back" in caplog.text

    (root / "step_2" / "COMPLETE").unlink()
    (root / "latest").write_text("step_2\n")
    assert latest_checkpoint(tmp_path) == root / "step_1"

    (root / "latest").unlink()
    assert latest_checkpoint(tmp_path) == root / "step_1"
    shutil.rmtree(root / "step_1")
    assert latest_checkpoint(tmp_path) is None


def test_resolve_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for value in ("none", "None", "", "auto"):
        assert resolve_resume(value, run) is None
    save_tiny_checkpoint(run, 1)
    step_2 = save_tiny_checkpoint(run, 2)
    step_1 = run / "checkpoints" / "step_1"
    assert resolve_resume("auto", run) == step_2
    assert resolve_resume("none", run) is None
    assert resolve_resume(str(run), tmp_path / "other") == step_2
    assert resolve_resume(str(run / "checkpoints"), tmp_path / "other") == step_2
    assert resolve_resume(str(step_1), run) == step_1


def test_resolve_resume_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist.*'auto' or 'none'"):
        resolve_resume(str(missing), tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path} is neither a run directory"):
        resolve_resume(str(tmp_path), tmp_path)

    step = save_tiny_checkpoint(tmp_path / "run", 1)
    (step / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=f"{step}.*no COMPLETE marker"):
        resolve_resume(str(step), tmp_path)
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        resolve_resume(str(tmp_path / "run"), tmp_path)
    with pytest.raises(CheckpointError, match="pointer but no usable checkpoint.*'none'"):
        resolve_resume("auto", tmp_path / "run")
