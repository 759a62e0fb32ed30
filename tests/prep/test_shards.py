"""Writing webdataset shards (``prep.shards``, `ndino data shard`): deterministic bytes, an index that
finds damaged shards, webdataset-readable samples, missing images dropped, HF dataset folders read."""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds
from PIL import Image

from llava_ndino.cli import main
from llava_ndino.data.shards import ShardRecords, verify_shards
from llava_ndino.prep.shards import hf_items, llava_items, write_shards


def _shard(shapes_json: Path, out: Path, per_shard: int = 3) -> dict:
    return write_shards(llava_items(shapes_json, None), out, per_shard, source=str(shapes_json))


def test_shards_are_deterministic_indexed_and_webdataset_readable(shapes_json, tmp_path: Path) -> None:
    first, second = _shard(shapes_json, tmp_path / "a"), _shard(shapes_json, tmp_path / "b")
    assert first["shards"] == second["shards"] and len(first["shards"]) == 8 and first["samples"] == 24
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    assert verify_shards(tmp_path / "a") == []
    damaged = tmp_path / "a" / first["shards"][2]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"x")
    assert verify_shards(tmp_path / "a") == [first["shards"][2]["file"]]

    samples = list(wds.WebDataset(str(tmp_path / "b" / first["shards"][0]["file"]), shardshuffle=False))
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [["0.png", "json"]] * 3
    record = json.loads(samples[0]["json"])
    original = json.loads(shapes_json.read_text())[0]
    assert record["id"] == original["id"] and record["conversations"] == original["conversations"]
    assert samples[0]["0.png"] == (shapes_json.parent / original["image"]).read_bytes()
    records = ShardRecords(tmp_path / "b")
    assert len(records) == 24 and records.get(5)[0]["id"] == json.loads(shapes_json.read_text())[5]["id"]


def test_shard_cli_drops_missing_images_and_reads_hf_folders(tmp_path: Path, capsys) -> None:
    from datasets import Dataset
    from datasets import Image as ImageFeature

    images = [Image.new("RGB", (20 + i, 10), (i * 40, 0, 0)) for i in range(3)]
    turns = [
        [{"from": "human", "value": "<image>\nCosa?"}, {"from": "gpt", "value": f"r{i}"}] for i in range(3)
    ]
    hf = Dataset.from_dict({"id": ["a", "b", "c"], "image": images, "conversations": turns})
    hf.cast_column("image", ImageFeature()).save_to_disk(str(tmp_path / "hf"))
    rows = list(hf_items(tmp_path / "hf"))
    assert [r["id"] for r, _ in rows] == ["a", "b", "c"] and all(len(i) == 1 and i[0][1] for _, i in rows)
    assert main(["data", "shard", str(tmp_path / "hf"), str(tmp_path / "hf_shards")]) == 0
    record, (image,) = ShardRecords(tmp_path / "hf_shards").get(2)
    assert record["id"] == "c" and image.open().size == (22, 10)

    data = tmp_path / "data.json"
    good = {"id": "ok", "image": "x.png", "conversations": turns[0]}
    data.write_text(json.dumps([good, {**good, "id": "gone", "image": "none.png"}]))
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main(["data", "shard", str(data), str(tmp_path / "out")]) == 2  # one of two lost: refused
    assert "1 of 2 samples were dropped, above --max-skip-ratio 0.01" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["data", "shard", str(data), str(tmp_path / "out"), "--max-skip-ratio", "0.5"]) == 0
    assert "dropped gone: missing image(s) none.png" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "index.json").read_text())["samples"] == 1
