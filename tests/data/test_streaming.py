"""Streaming shards (``data.streaming``): exact resume, rank and worker splits that read disjoint
shards, and a weighted mixture of shard folders."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from llava_ndino.data.shards import ShardFile
from llava_ndino.data.streaming import ShardStream
from llava_ndino.prep.shards import llava_items, write_shards


class IdEncoder:
    """Stands in for ConversationEncoder: returns the sample id, so streams can be compared cheaply."""

    def encode(self, record, index, images=None):
        assert all(image.data for image in images)
        return record["id"]


def _shard(shapes_json: Path, out: Path, per_shard: int = 3) -> dict:
    return write_shards(llava_items(shapes_json, None), out, per_shard, source=str(shapes_json))


def _loader(folder: Path, start: int = 0, rank: int = 0, world: int = 1, workers: int = 2, **kw) -> list:
    stream = ShardStream([(folder, 1.0)], IdEncoder(), seed=7, batch_size=2, shuffle_buffer=4, **kw)
    stream.set_position(start, rank, world)
    return list(islice(DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=list), 12))


def test_streaming_resumes_exactly_and_splits_ranks_and_workers(
    shapes_json, tmp_path: Path, monkeypatch
) -> None:
    _shard(shapes_json, tmp_path / "s", per_shard=3)
    full = _loader(tmp_path / "s")
    assert len({i for batch in full for i in batch}) >= 20, "a pass visits (nearly) every sample once"
    assert _loader(tmp_path / "s", start=10)[:7] == full[5:12], "resume after 5 batches (10 samples)"
    assert _loader(tmp_path / "s", workers=0) != full  # single worker: one slot reads every shard
    ranks = [_loader(tmp_path / "s", rank=r, world=2, workers=1) for r in range(2)]
    assert _loader(tmp_path / "s", start=8, rank=1, world=2, workers=1)[:8] == ranks[1][2:10]
    first_pass = [{i for batch in stream[:3] for i in batch} for stream in ranks]
    assert not first_pass[0] & first_pass[1], "ranks read disjoint shards"
    reads = []
    original = ShardFile.get
    monkeypatch.setattr(ShardFile, "get", lambda self, j: reads.append(j) or original(self, j))
    late = _loader(tmp_path / "s", start=400, workers=0)
    assert len(reads) == 24 and len(late) == 12, "resuming after 400 samples reads only the samples it uses"
    with pytest.raises(ValueError, match="fewer than ranks x loader workers"):
        _loader(tmp_path / "s", workers=0, world=9, rank=8)


def test_streaming_mixture_follows_the_weights(shapes_json, tmp_path: Path) -> None:
    _shard(shapes_json, tmp_path / "x", per_shard=6)
    other = tmp_path / "other.json"
    records = json.loads(shapes_json.read_text())
    for record in records:
        record["id"] = "other-" + record["id"]
        record["image"] = str(shapes_json.parent / record["image"])
    other.write_text(json.dumps(records))
    write_shards(llava_items(other, None, allow_outside=True), tmp_path / "y", 6)  # absolute paths: trusted
    stream = ShardStream([(tmp_path / "x", 0.8), (tmp_path / "y", 0.2)], IdEncoder(), 1, 2, 4)
    ids = [record["id"] for record, _ in islice(stream.raw_stream(0, 1), 1000)]
    share = sum(i.startswith("other-") for i in ids) / len(ids)
    assert 0.16 < share < 0.24
