"""The loop over the new data paths: streaming shards, length grouping and packing train and resume
exactly (a run stopped and resumed logs the same losses as an uninterrupted one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.prep.shards import llava_items, write_shards
from llava_ndino.synthetic.shapes import write_shapes_dataset
from llava_ndino.train.loop import train


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: (row["loss"], row["pad_fraction"]) for row in rows}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    data = write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=5, width=112, height=80)
    records = json.loads(data.read_text())
    for i, record in enumerate(records[::3]):  # some text-only samples of various lengths
        record.pop("image")
        record["conversations"][0]["value"] = "Dimmi qualcosa " * (1 + 4 * i)
    data.write_text(json.dumps(records))
    write_shards(llava_items(data, None), data.parent / "shards", 4)
    return data


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param("stream", id="streaming-shards"),
        pytest.param("grouped_packed", id="grouped+packed"),
    ],
)
def test_resume_is_exact(shapes: Path, tmp_path: Path, mode: str) -> None:
    if mode == "stream":
        data = [f"data.path={shapes.parent / 'shards'}", "data.shuffle_buffer=3", "data.num_workers=2"]
    else:
        data = [
            f"data.path={shapes}",
            f"data.image_root={shapes.parent}",
            "data.group_by_length=true",
            "data.group_window=2",
            "data.packing=true",
        ]
    args = [
        "recipe=demo",
        "model.tiny.hidden_size=64",
        "data.synthetic.kind=null",
        "train.per_device_batch_size=2",
        "train.schedule=constant",  # a 3-step run ends its cosine at lr 0; constant keeps runs comparable
        "train.log_every=1",
        "train.save_every=3",
        "train.keep_last=0",
        *data,
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(load_config([*args, "train.max_steps=5", f"output_dir={straight}"])).step == 5
    train(load_config([*args, "train.max_steps=3", f"output_dir={resumed}"]))  # 3 batches: an odd worker turn
    assert train(load_config([*args, "train.max_steps=5", f"output_dir={resumed}"])).step == 5
    expected, got = _losses(straight), _losses(resumed)
    assert [got[s] for s in (4, 5)] == [expected[s] for s in (4, 5)]
    if mode == "grouped_packed":
        assert all(pad == 0.0 for _, pad in expected.values())
        cached = json.loads((resumed / "data_lengths.json").read_text())
        assert len(cached["lengths"]) == 24 and cached["has_image"].count(False) == 8
