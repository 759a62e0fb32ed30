"""Image paths from data stay inside their root: ``..``, absolute paths and symbolic links that lead out
are skipped in training (reason ``outside_image_root``) and never copied into a shard."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.prep.shards import llava_items, write_shards
from llava_ndino.synthetic.shapes import write_shapes_dataset
from llava_ndino.train.loop import train

SECRET = "not for a shared shard"


@pytest.fixture
def hostile_data(tmp_path: Path) -> tuple[Path, Path, set[str]]:
    """Shapes data whose first three samples point outside the data folder; returns (json, root, ids)."""
    root = tmp_path / "data"
    data = write_shapes_dataset(root, 12, seed=1, width=64, height=48)
    secret = tmp_path / "secret.png"
    secret.write_text(SECRET)
    os.symlink(secret, root / "images" / "link.png")
    records = json.loads(data.read_text())
    escapes = {"../secret.png", str(secret), "images/link.png"}
    for record, ref in zip(records, sorted(escapes), strict=False):
        record["image"] = ref
    data.write_text(json.dumps(records))
    return data, root, {record["id"] for record in records[: len(escapes)]}


def test_training_skips_images_outside_the_root(hostile_data, tmp_path: Path) -> None:
    data, root, bad_ids = hostile_data
    run = tmp_path / "run"
    train(
        load_config(
            [
                "recipe=demo",
                f"output_dir={run}",
                "data.synthetic.kind=null",
                f"data.path={data}",
                f"data.image_root={root}",
                "data.max_skip_ratio=0.5",
                "model.tiny.hidden_size=64",
                "train.max_steps=1",
                "train.per_device_batch_size=12",
                "train.cpu_threads=1",
            ]
        )
    )
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert {row["id"] for row in skipped} == bad_ids
    assert {row["reason"] for row in skipped} == {"outside_image_root"}


def test_shards_never_carry_a_file_from_outside_the_root(hostile_data, tmp_path: Path) -> None:
    data, root, bad_ids = hostile_data
    index = write_shards(llava_items(data, root), tmp_path / "shards", 100, max_skip_ratio=0.5)
    assert set(index["dropped"]) == bad_ids
    assert all(why.startswith("outside_image_root") for why in index["dropped"].values())
    with tarfile.open(tmp_path / "shards" / index["shards"][0]["file"]) as tar:
        contents = [tar.extractfile(member).read() for member in tar.getmembers()]
    assert all(SECRET.encode() not in blob for blob in contents)


def test_the_key_allows_trusted_data_outside_the_root(hostile_data, tmp_path: Path) -> None:
    data, root, _ = hostile_data
    index = write_shards(llava_items(data, root, allow_outside=True), tmp_path / "shards", 100)
    assert index["samples"] == 12  # the "images" are unreadable as pictures, but a trusting user gets them
