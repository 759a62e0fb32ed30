"""Shards: a shard changed after indexing is refused when first opened, malformed members become
skipped samples (never a raw traceback), and `ndino data shard` never leaves shards without their
index nor publishes a set that lost more samples than the skip ratio allows."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.shards import FORMAT, INDEX, ShardRecords
from llava_ndino.prep.shards import llava_items, write_shards
from llava_ndino.synthetic.shapes import write_shapes_dataset


def _member(tar: tarfile.TarFile, name: str, data: bytes, size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data))


def _index(folder: Path, files: dict[str, int]) -> None:
    """An index whose sizes and hashes match the files as they are (a forged, self-consistent index)."""
    shards = []
    for name, samples in files.items():
        data = (folder / name).read_bytes()
        shards.append(
            {"file": name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
    total = sum(files.values())
    (folder / INDEX).write_text(
        json.dumps({"format": FORMAT, "samples": total, "shards": shards, "dropped": {}})
    )


@pytest.fixture
def good_shards(tmp_path: Path) -> Path:
    data = write_shapes_dataset(tmp_path / "data", 6, seed=2, width=64, height=48)
    write_shards(llava_items(data, None), tmp_path / "shards", 3)
    return tmp_path / "shards"


def test_a_shard_changed_after_indexing_is_refused_at_first_open(good_shards: Path) -> None:
    index = json.loads((good_shards / INDEX).read_text())
    shard = good_shards / index["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01  # inside the first member: same size, other content
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"shard .*{shard.name} does not match the SHA-256 in its index"):
        ShardRecords(good_shards).get(0)


def test_malformed_members_are_skipped_samples(tmp_path: Path) -> None:
    folder = tmp_path / "forged"
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        _member(tar, "000000000.json", b"{not json")  # invalid JSON
        _member(tar, "000000001.0.png", b"png without a record")  # sample without JSON
        _member(tar, "000000002.json", json.dumps({"id": "a", "image": "000000002.0.png"}).encode())
        link = tarfile.TarInfo("000000002.0.png")  # the image is a symlink member
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(link)
        _member(tar, "000000003.json", b"[1, 2]")  # not an object
    _index(folder, {"shard-000000.tar": 4})
    records = ShardRecords(folder)
    reasons = []
    for index in range(4):
        with pytest.raises(SampleError) as caught:
            records.get(index)
        reasons.append(caught.value.reason)
    assert reasons == ["bad_shard_member"] * 4


@pytest.mark.parametrize("content", [b"this is not a tar at all", b""])
def test_a_file_that_is_not_a_tar_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "shard-000000.tar").write_bytes(content)
    _index(folder, {"shard-000000.tar": 1})
    with pytest.raises(ValueError, match="is not a readable tar"):
        ShardRecords(folder).get(0)


def test_shard_writer_refuses_to_publish_a_set_that_lost_too_many_samples(tmp_path: Path) -> None:
    """Without --image-root, 6 of 7 samples were dropped and the command exited 0."""
    data = write_shapes_dataset(tmp_path / "data", 8, seed=2, width=64, height=48)
    with pytest.raises(ValueError, match=r"8 of 8 samples were dropped, above --max-skip-ratio 0.01"):
        write_shards(llava_items(data, tmp_path), tmp_path / "shards", 4)  # the wrong image root
    assert not (tmp_path / "shards").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left behind


def test_shard_writer_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "data", 4, seed=2, width=64, height=48)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="non-empty folder without shards"):
        write_shards(llava_items(data, None), tmp_path / "notes", 4)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "years of work"
