"""A full disk fails the save clearly, before the work is lost to a livelock, and a flood of bad samples
logs each reason once instead of gigabytes of lines."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import CheckpointError, latest_checkpoint
from llava_ndino.train import checkpoint
from llava_ndino.train.loop import train

BASE = ["recipe=demo", "model.tiny.hidden_size=64", "data.synthetic.image_size=112", "train.cpu_threads=1"]
Usage = namedtuple("Usage", "total used free")


def test_a_save_that_cannot_fit_fails_before_writing_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    train(load_config([*BASE, f"output_dir={run}", "train.max_steps=1", "train.save_every=1"]))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(CheckpointError, match=r"no space left for the next checkpoint .* needs about .* GiB"):
        train(load_config([*BASE, f"output_dir={run}", "train.max_steps=2", "train.save_every=1"]))
    assert latest_checkpoint(run).name == "step_1"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_1"]


def test_enospc_during_a_save_names_the_sizes_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(CheckpointError, match=r"no space left on device while saving step_1: .* GiB written"):
        checkpoint.save_checkpoint(
            tmp_path,
            1,
            model_state={},
            optimizer_state={"state": {}},
            scheduler_state=None,
            trainer_state={},
            config_text="",
            keep_last=1,
        )
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the partial save gave its space back
    assert shutil.disk_usage(tmp_path).free > 0


def test_each_skip_reason_is_logged_once(broken_dataset, tmp_path: Path, caplog) -> None:
    path, expected = broken_dataset
    run = tmp_path / "run"
    files = [arg for arg in BASE if not arg.startswith("data.synthetic")]  # file data: no synthetic keys
    args = [*files, f"output_dir={run}", "data.synthetic.kind=null", f"data.path={path}"]
    args += [f"data.image_root={path.parent / 'images'}", "data.max_skip_ratio=0.9", "data.max_pixels=400000"]
    args += ["train.max_steps=8", "train.per_device_batch_size=4"]
    with caplog.at_level(logging.WARNING, logger="llava_ndino"):
        train(load_config(args))
    rows = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    reasons = [row["reason"] for row in rows]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(reasons) > len(set(reasons))  # the data repeat: some reasons come back
    assert len(logged) == len(set(reasons))  # but each is logged once


def test_a_resume_drops_the_skip_rows_written_after_its_checkpoint(tmp_path: Path) -> None:
    """skipped.jsonl keeps the rows up to the checkpoint's data position; the redone samples come again."""
    from llava_ndino.train.skips import SkipTracker

    rows = [
        {"id": f"s{i}", "reason": "missing_image", "message": "", "seen": seen}
        for i, seen in enumerate((4, 8, 12))
    ]
    (tmp_path / "skipped.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"torn')
    tracker = SkipTracker(tmp_path, max_ratio=0.5, dataset_size=100, enabled=True)
    tracker.load({"seen": 8, "reasons": {"missing_image": 2}})
    kept = [json.loads(line)["id"] for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert kept == ["s0", "s1"]
