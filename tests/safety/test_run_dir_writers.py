"""Run directories: one writer at a time, no silent mixing of runs, resumes that honour their config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import CONFIG_FILE, HISTORY_FILE, LOCK_FILE
from llava_ndino.train.loop import train
from llava_ndino.train.run_lock import RunLock, RunLockedError

BASE = ["recipe=demo", "model.tiny.hidden_size=64", "data.synthetic.image_size=112", "train.cpu_threads=1"]


def _cfg(run: Path, *extra: str):
    return load_config([*BASE, f"output_dir={run}", *extra])


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory) -> Path:
    """A demo run saved at step 2."""
    run = tmp_path_factory.mktemp("locked") / "run"
    train(_cfg(run, "train.max_steps=2", "train.save_every=2"))
    return run


def test_second_writer_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = RunLock(run)
    holder.acquire()
    try:
        with pytest.raises(RunLockedError, match=r"in use by process \d+"):
            train(_cfg(run, "train.max_steps=1"))
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing else written
    finally:
        holder.release()


def test_lock_of_a_killed_process_is_not_stale(tmp_path: Path) -> None:
    """The kernel drops a flock with its process, so a run killed with -9 never blocks the next one."""
    run = tmp_path / "run"
    run.mkdir()
    code = f"from llava_ndino.train.run_lock import RunLock; RunLock({str(run)!r}).acquire(); import os; os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    lock = RunLock(run)
    lock.acquire()
    lock.release()


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        (["train.lr=0.5"], r"optimiser settings \(train.lr 0.001 -> 0.5\)"),
        (["train.weight_decay=0.1"], "train.weight_decay"),
        (["model.tiny.layers=2"], r"different model or objective \(model.tiny.layers 3 -> 2\)"),
        (["data.template=plain"], "data.template"),
    ],
)
def test_resume_refuses_changes_it_cannot_honour_before_writing(two_step_run: Path, extra, refused) -> None:
    config_before = (two_step_run / CONFIG_FILE).read_text()
    skeleton_before = (two_step_run / "model" / "config.json").read_text()
    with pytest.raises(ValueError, match=refused):
        train(_cfg(two_step_run, "train.max_steps=3", *extra))
    assert (two_step_run / CONFIG_FILE).read_text() == config_before
    assert (two_step_run / "model" / "config.json").read_text() == skeleton_before


def test_resume_none_refuses_a_directory_holding_another_run(two_step_run: Path) -> None:
    metrics = (two_step_run / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="resume=none"):
        train(_cfg(two_step_run, "train.max_steps=2", "resume=none"))
    assert (two_step_run / "metrics.jsonl").read_text() == metrics


def test_changes_a_resume_applies_are_recorded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_cfg(run, "train.max_steps=2", "train.save_every=2"))
    result = train(_cfg(run, "train.max_steps=3", "train.save_every=2", "train.log_every=1"))
    assert result.step == 3
    (entry,) = [json.loads(line) for line in (run / HISTORY_FILE).read_text().splitlines()]
    assert entry["resumed_at_step"] == 2
    assert entry["changes"] == {"train.log_every": [50, 1], "train.max_steps": [2, 3]}
