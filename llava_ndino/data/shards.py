"""Webdataset tar shards: ``ndino data shard`` writes them, :class:`ShardRecords` reads them back.

A sample ``K`` is stored as ``K.json`` (its record, image references renamed to the members) and
``K.0.jpg``, ``K.1.png``, ... (the original image bytes, never re-encoded). ``index.json`` lists
every shard with its sample count, size and SHA-256. Writing is deterministic: the same input gives
byte-identical shards (fixed member order, mtime, owner and mode).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from llava_ndino.data.dataset import RecordSource
from llava_ndino.data.images import ImageBytes

INDEX = "index.json"
FORMAT = "llava-ndino-webdataset-1"


def is_shard_dir(path: Path) -> bool:
    """True when ``path`` is a folder written by :func:`write_shards`."""
    return (Path(path) / INDEX).is_file()


def read_index(folder: Path) -> dict:
    """Read a shard folder's ``index.json``; errors say how to create one."""
    path = Path(folder) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write shards with `ndino data shard`")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown shard format {index.get('format')!r} (expected {FORMAT})")
    return index


def verify_shards(folder: Path) -> list[str]:
    """Names of the shards whose size or SHA-256 differs from the index (empty when all are intact)."""
    bad = []
    for shard in read_index(folder)["shards"]:
        data = (Path(folder) / shard["file"]).read_bytes()
        if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
            bad.append(shard["file"])
    return bad


class ShardFile:
    """Random access to the samples of one tar shard by member offsets; the headers are scanned on
    first use (seeks only, no image data is read)."""

    def __init__(self, path: Path, expected: int | None = None):
        self.path, self.expected = Path(path), expected
        self._entries: list[dict[str, tuple[int, int]]] | None = None

    def entries(self) -> list[dict[str, tuple[int, int]]]:
        """Per sample, in key order: member name -> (data offset, size)."""
        if self._entries is None:
            members: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(self.path, mode="r") as tar:
                for member in tar:
                    if member.isfile():
                        stem = member.name.partition(".")[0]
                        members.setdefault(stem, {})[member.name] = (member.offset_data, member.size)
            self._entries = [parts for _, parts in sorted(members.items())]
            if self.expected is not None and len(self._entries) != self.expected:
                raise ValueError(
                    f"{self.path} holds {len(self._entries)} samples but its index says {self.expected}; "
                    "the shard changed after indexing: write the shards again with `ndino data shard`"
                )
        return self._entries

    def get(self, index: int) -> tuple[dict, list[ImageBytes]]:
        """Sample ``index`` of the shard: (record, encoded images)."""
        parts = self.entries()[index]
        with self.path.open("rb") as handle:

            def read(name: str) -> bytes:
                offset, size = parts[name]
                handle.seek(offset)
                return handle.read(size)

            record = json.loads(next(read(name) for name in parts if name.endswith(".json")))
            return record, [ImageBytes(f"{self.path.name}:{ref}", read(ref)) for ref in image_refs(record)]


def shard_files(folder: Path) -> list[ShardFile]:
    """The shards of a shard folder, in index order, each with its indexed sample count."""
    return [ShardFile(Path(folder) / s["file"], s["samples"]) for s in read_index(folder)["shards"]]


class ShardRecords(RecordSource):
    """Random access to the samples of a shard folder (for validation and map-style use; training
    streams with :class:`~llava_ndino.data.streaming.ShardStream`)."""

    def __init__(self, folder: Path):
        self.files = shard_files(folder)
        self.index = [(f, j) for f, file in enumerate(self.files) for j in range(file.expected)]

    def __len__(self) -> int:
        return len(self.index)

    def get(self, index: int) -> tuple[dict, list[ImageBytes]]:
        f, j = self.index[index]
        return self.files[f].get(j)


def image_refs(record: dict) -> list[str]:
    refs = record.get("image", record.get("images"))
    return [] if refs is None else [refs] if isinstance(refs, str) else list(refs)
