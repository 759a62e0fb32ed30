"""Manifests and mixtures, deterministic webdataset shards, and the streaming loader's splits,
weights and exact resume."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from llava_ndino.cli import main
from llava_ndino.data.manifests import load_manifests, load_mixtures, resolve_mixture
from llava_ndino.data.mixture import map_style_mixture, mixture_parts
from llava_ndino.data.shards import ShardFile, ShardRecords, verify_shards
from llava_ndino.data.streaming import ShardStream
from llava_ndino.prep.shards import hf_items, llava_items, write_shards
from llava_ndino.synthetic.shapes import write_shapes_dataset


class IdEncoder:
    """Stands in for ConversationEncoder: returns the sample id, so streams can be compared cheaply."""

    def encode(self, record, index, images=None):
        assert all(image.data for image in images)
        return record["id"]


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3, width=64, height=48)


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
    assert main(["data", "shard", str(data), str(tmp_path / "out")]) == 0
    assert "dropped gone: missing image(s) none.png" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "index.json").read_text())["samples"] == 1


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
    write_shards(llava_items(other, None), tmp_path / "y", 6)
    stream = ShardStream([(tmp_path / "x", 0.8), (tmp_path / "y", 0.2)], IdEncoder(), 1, 2, 4)
    ids = [record["id"] for record, _ in islice(stream.raw_stream(0, 1), 1000)]
    share = sum(i.startswith("other-") for i in ids) / len(ids)
    assert 0.16 < share < 0.24


def test_manifests_mixtures_and_data_list(tmp_path: Path, capsys, monkeypatch, shapes_json) -> None:
    manifests = load_manifests()
    assert len(manifests) == 11 and {m.modality for m in manifests.values()} == {"image-text", "text"}
    assert all(m.translation_model for m in manifests.values() if m.name.endswith("_ita"))
    mixtures = load_mixtures()
    assert {"align", "adapt", "short_it", "long_it"} <= set(mixtures)
    assert all(abs(sum(w.values()) - 1) < 1e-9 for w in mixtures.values())

    root = tmp_path / "root"
    long_it = manifests["llava_instruct_conv_58k_ita"]
    (root / long_it.path).parent.mkdir(parents=True)
    (root / long_it.path).write_text(shapes_json.read_text())
    (root / long_it.image_root).parent.mkdir(parents=True)
    (root / long_it.image_root).symlink_to(shapes_json.parent)
    monkeypatch.setenv("NDINO_DATA_ROOT", str(root))
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "llava_instruct_conv_58k_ita" in out and "present" in out and "missing" in out
    assert [m.name for m, _ in resolve_mixture("long_it", root)] == ["llava_instruct_conv_58k_ita"]
    with pytest.raises(FileNotFoundError, match="wit_it"):
        resolve_mixture("adapt", root)
    records = map_style_mixture(mixture_parts("long_it", None), None, seed=0)
    record, _ = records.get(0)
    assert len(records) == 24 and Path(record["image"]).is_file()


def test_validate_and_train_data_from_manifests_and_shards(tmp_path: Path, monkeypatch, shapes_json) -> None:
    from llava_ndino.config import load_config
    from llava_ndino.data.dataset import EncodedDataset
    from llava_ndino.train.tasks.registry import make_task

    root = tmp_path / "root"
    long_it = load_manifests()["llava_instruct_conv_58k_ita"]
    (root / long_it.path).parent.mkdir(parents=True)
    (root / long_it.path).write_text(shapes_json.read_text())
    (root / long_it.image_root).parent.mkdir(parents=True)
    (root / long_it.image_root).symlink_to(shapes_json.parent)
    _shard(shapes_json, tmp_path / "shards")
    monkeypatch.setenv("NDINO_DATA_ROOT", str(root))
    for target in ("llava_instruct_conv_58k_ita", str(tmp_path / "shards")):
        out = tmp_path / "report" / Path(target).name
        assert main(["data", "validate", target, "--out", str(out), "--recipe", "demo"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["usable"] == 24 and summary["images"]["count"] == 24 and summary["rejected"] == {}

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
