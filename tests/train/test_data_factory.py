"""The training data (``train.data_factory``): a task reads a mixture of manifests or a shards folder,
and runs over streaming shards or length-grouped packed rows resume exactly (a run stopped and resumed
logs the same losses as an uninterrupted one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.data.dataset import EncodedDataset
from llava_ndino.data.streaming import ShardStream
from llava_ndino.prep.shards import llava_items, write_shards
from llava_ndino.synthetic.shapes import write_shapes_dataset
from llava_ndino.train.loop import train
from llava_ndino.train.tasks.registry import make_task


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


def test_task_data_from_a_mixture_and_from_shards(long_it_data_root, shapes_json, tmp_path: Path) -> None:
    """data.mixture gives a map-style data set over the manifests' files; data.path=SHARDS a stream that
    starts where the sampler would."""
    write_shards(llava_items(shapes_json, None), tmp_path / "shards", 3, source=str(shapes_json))
    task = make_task(
        load_config(["recipe=demo", "output_dir=x", "data.synthetic.kind=null", "data.mixture=long_it"])
    )
    task.build()
    mixture = task.dataset()
    assert isinstance(mixture, EncodedDataset) and len(mixture) == 24
    assert mixture[0].pixel_values is not None
    task.cfg.data.mixture, task.cfg.data.path = None, str(tmp_path / "shards")
    stream = task.dataset()
    assert isinstance(stream, ShardStream) and task.sampler(stream, 6, 0, 1) is None and stream.start == 6
