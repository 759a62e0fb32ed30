"""The loop (``train.loop``) and bad input: a run over deliberately broken samples completes and lists
every broken sample with its reason (from a JSON file or from streamed shards), a run above
data.max_skip_ratio stops, and the skip tracker counts skips below the limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_ndino.cli import main
from llava_ndino.config import load_config
from llava_ndino.data.dataset import Batch, Skipped
from llava_ndino.train.loop import train
from llava_ndino.train.skips import SkipTracker


def _overrides(path: Path, out: Path) -> list[str]:
    return [
        "recipe=demo",
        f"output_dir={out}",
        "model.tiny.hidden_size=64",
        "data.synthetic.kind=null",
        f"data.path={path}",
        f"data.image_root={path.parent / 'images'}",
        "data.max_length=512",
        "data.max_pixels=400000",
        "data.max_skip_ratio=0.6",
    ]


def test_training_over_broken_samples_completes_and_lists_them(broken_dataset, tmp_path: Path) -> None:
    path, expected = broken_dataset
    cfg = load_config(
        [
            *_overrides(path, tmp_path / "run"),
            "train.max_steps=4",
            "train.per_device_batch_size=4",
            "train.log_every=1",
            "train.save_every=100",
        ]
    )
    result = train(cfg)
    assert result.status == "completed" and result.step == 4
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {row["id"]: row["reason"] for row in listed} == expected
    assert len(listed) == len(expected), "one epoch: every broken sample listed once"
    assert all(row["id"] in row["message"] for row in listed)


def test_training_aborts_above_max_skip_ratio(broken_dataset, tmp_path: Path) -> None:
    path, _ = broken_dataset
    overrides = [
        *_overrides(path, tmp_path / "run"),
        "data.max_skip_ratio=0.2",
        "train.max_steps=4",
        "train.per_device_batch_size=4",
    ]
    with pytest.raises(RuntimeError, match=r"max_skip_ratio=0.2; see .*skipped.jsonl"):
        train(load_config(overrides))


def test_streamed_shards_skip_the_same_broken_samples(broken_dataset, tmp_path: Path) -> None:
    path, expected = broken_dataset
    images = str(path.parent / "images")
    shard = [
        "data",
        "shard",
        str(path),
        str(tmp_path / "shards"),
        "--image-root",
        images,
        "--samples-per-shard",
        "4",
        "--max-skip-ratio",
        "0.5",  # the broken set loses one sample in sixteen when sharded
    ]
    assert main(shard) == 0
    streamed = [f"data.path={tmp_path / 'shards'}", "data.shuffle_buffer=1", "train.max_steps=4"]
    result = train(
        load_config([*_overrides(path, tmp_path / "run"), *streamed, "train.per_device_batch_size=4"])
    )
    assert result.status == "completed"
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    dropped_when_sharding = {"missing"}  # 15 samples streamed in order: one pass and one more
    assert {row["id"]: row["reason"] for row in listed} == {
        k: v for k, v in expected.items() if k not in dropped_when_sharding
    }


def test_skip_tracker_tolerates_ratio_below_limit(tmp_path: Path) -> None:
    tracker = SkipTracker(tmp_path, max_ratio=0.2, dataset_size=10, enabled=False)
    tracker.update(Batch({"x": torch.zeros(1)}, num_raw=10, skipped=[Skipped("a", "missing_image", "m")]))
    assert tracker.state() == {"seen": 10, "reasons": {"missing_image": 1}}
