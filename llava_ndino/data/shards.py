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

from llava_ndino.data.conversation import SampleError
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


_VERIFIED: dict[tuple[str, int, int], str] = {}
"""SHA-256 of shards already hashed in this process, by (path, size, mtime): each is hashed once."""


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        with path.open("rb") as handle:
            _VERIFIED[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _VERIFIED[key]


class ShardFile:
    """Random access to the samples of one tar shard by member offsets. On first use the shard is
    checked against its index (size and SHA-256, hashed once per process) and its headers are scanned
    (seeks only); a sample whose members are missing or malformed raises :class:`SampleError`."""

    def __init__(
        self, path: Path, expected: int | None = None, size: int | None = None, sha256: str | None = None
    ):
        self.path, self.expected = Path(path), expected
        self.size, self.sha256 = size, sha256
        self._entries: list[dict[str, tuple[int, int]]] | None = None

    def _verify(self) -> None:
        rewrite = "write the shards again with `ndino data shard`"
        if not self.path.is_file():
            raise ValueError(f"shard {self.path} is missing; {rewrite}")
        if self.size is not None and self.path.stat().st_size != self.size:
            raise ValueError(
                f"shard {self.path} has {self.path.stat().st_size} bytes, its index says {self.size}; {rewrite}"
            )
        if self.sha256 is not None and _sha256(self.path) != self.sha256:
            raise ValueError(
                f"shard {self.path} does not match the SHA-256 in its index: it changed after indexing; {rewrite}"
            )

    def entries(self) -> list[dict[str, tuple[int, int]]]:
        """Per sample, in key order: member name -> (data offset, size)."""
        if self._entries is None:
            self._verify()
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(self.path, mode="r") as tar:
                    for member in tar:
                        if member.isfile():  # links and devices are never data
                            stem = member.name.partition(".")[0]
                            members.setdefault(stem, {})[member.name] = (member.offset_data, member.size)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ValueError(
                    f"shard {self.path} is not a readable tar ({exc}); write the shards again"
                ) from None
            self._entries = [parts for _, parts in sorted(members.items())]
            if self.expected is not None and len(self._entries) != self.expected:
                raise ValueError(
                    f"{self.path} holds {len(self._entries)} samples but its index says {self.expected}; "
                    "the shard changed after indexing: write the shards again with `ndino data shard`"
                )
        return self._entries

    def get(self, index: int) -> tuple[dict, list[ImageBytes]]:
        """Sample ``index`` of the shard: (record, encoded images); :class:`SampleError` when malformed."""
        parts = self.entries()[index]
        sample_id = f"{self.path.name}#{index}"
        with self.path.open("rb") as handle:

            def read(name: str) -> bytes:
                if name not in parts:
                    raise SampleError(
                        sample_id, "bad_shard_member", f"member {name} is missing from {self.path.name}"
                    )
                offset, size = parts[name]
                handle.seek(offset)
                data = handle.read(size)
                if len(data) != size:
                    raise SampleError(
                        sample_id, "bad_shard_member", f"member {name} of {self.path.name} is cut short"
                    )
                return data

            names = [name for name in parts if name.endswith(".json")]
            if not names:
                raise SampleError(
                    sample_id, "bad_shard_member", f"sample has no JSON member in {self.path.name}"
                )
            try:
                record = json.loads(read(names[0]))
            except (ValueError, UnicodeDecodeError) as exc:
                raise SampleError(
                    sample_id, "bad_shard_member", f"{names[0]} is not valid JSON ({exc})"
                ) from None
            if not isinstance(record, dict):
                raise SampleError(sample_id, "bad_shard_member", f"{names[0]} is not a JSON object")
            refs = image_refs(record)
            if not all(isinstance(ref, str) for ref in refs):
                raise SampleError(sample_id, "malformed", "'image' must name the sample's image members")
            return record, [ImageBytes(f"{self.path.name}:{ref}", read(ref)) for ref in refs]


def shard_files(folder: Path) -> list[ShardFile]:
    """The shards of a shard folder, in index order, each with its indexed sample count, size and hash."""
    return [
        ShardFile(Path(folder) / s["file"], s["samples"], s.get("bytes"), s.get("sha256"))
        for s in read_index(folder)["shards"]
    ]


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


def image_refs(record: dict) -> list:
    """The record's image references (``image`` or ``images``), as a list; a malformed value such as a
    number comes back as one item, for the caller to refuse with a reason."""
    refs = record.get("image", record.get("images"))
    return [] if refs is None else list(refs) if isinstance(refs, list) else [refs]
