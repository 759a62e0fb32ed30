"""Writing webdataset shards (`ndino data shard`): a LLaVA JSON/JSONL plus image folder, or an HF
datasets folder, into deterministic tar shards with an index and checksums (the same input gives
byte-identical shards). Reading them is ``llava_ndino.data.shards``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.dataset import read_records
from llava_ndino.data.images import image_path, is_file
from llava_ndino.data.shards import FORMAT, INDEX, image_refs
from llava_ndino.export.folders import fresh_sibling, swap_folder


def llava_items(
    path: Path, image_root: Path | None, allow_outside: bool = False
) -> Iterator[tuple[dict, list[tuple[str, bytes | str | None]]]]:
    """(record, [(image name, bytes, or None when missing, or why it is refused)]) for every sample of a
    LLaVA JSON/JSONL file. Images outside the root are refused unless ``allow_outside``: a shard is
    meant to be shared, and must not carry a system file named by a crafted path."""
    root = Path(image_root) if image_root else Path(path).parent
    for index, record in enumerate(read_records(path)):
        refs = image_refs(record) if isinstance(record, dict) else []
        sample_id = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        images: list[tuple[str, bytes | str | None]] = []
        for ref in refs:
            try:
                file = image_path(root, ref, sample_id, allow_outside)
            except SampleError as err:
                images.append((str(ref), f"{err.reason}: {err}"))
                continue
            try:
                images.append((str(ref), file.read_bytes() if is_file(file, sample_id) else None))
            except SampleError as err:
                images.append((str(ref)[:80], f"{err.reason}: {err}"))
            except OSError as err:
                images.append((str(ref)[:80], f"unreadable_image: {err}"))
        yield record, images


def hf_items(path: Path) -> Iterator[tuple[dict, list[tuple[str, bytes | None]]]]:
    """The same for an HF ``datasets`` folder saved with ``save_to_disk`` (image columns undecoded)."""
    from datasets import Image as ImageFeature
    from datasets import Sequence, load_from_disk

    dataset = load_from_disk(str(path))
    for column in ("image", "images"):
        feature = dataset.features.get(column)
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        elif isinstance(feature, Sequence | list) and isinstance(
            getattr(feature, "feature", None), ImageFeature
        ):
            dataset = dataset.cast_column(column, Sequence(ImageFeature(decode=False)))
    for row in dataset:
        record = {k: v for k, v in row.items() if k not in ("image", "images")}
        value = row.get("image", row.get("images"))
        values = [] if value is None else value if isinstance(value, list) else [value]
        images = []
        for i, item in enumerate(values):
            if isinstance(item, dict):
                name = Path(item.get("path") or f"image{i}.png").name
                images.append((name, item.get("bytes") or None))
            else:
                images.append((str(item), None))
        if values:
            record["image" if "image" in row else "images"] = [name for name, _ in images]
        yield record, images


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _shard_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in entries:
            _add(tar, name, data)
    return buffer.getvalue()


def write_shards(
    items: Iterator[tuple[dict, list[tuple[str, bytes | str | None]]]],
    out_dir: Path,
    samples_per_shard: int = 1000,
    source: str = "",
    max_skip_ratio: float = 0.01,
) -> dict:
    """Write ``items`` as tar shards plus ``index.json`` into ``out_dir``; returns the index.

    Samples whose images are missing or refused are not written; the index lists them under
    ``dropped``. Everything is written into a temporary sibling folder that replaces ``out_dir`` only
    when it is complete and at most ``max_skip_ratio`` of the samples were dropped (as in training), so
    a failed or refused run never leaves shards without their index. ``out_dir`` may already hold
    shards (an ``index.json`` of ours); any other non-empty folder is refused.
    """
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INDEX).is_file():
        raise ValueError(f"{out_dir} is a non-empty folder without shards of ours: pick a new output folder")
    final, out_dir = out_dir, fresh_sibling(out_dir)
    try:
        index = _write_shards(items, out_dir, samples_per_shard, source)
        _check_dropped(index, max_skip_ratio, final)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    swap_folder(out_dir, final)
    return index


def _check_dropped(index: dict, max_skip_ratio: float, final: Path) -> None:
    """Refuse shards that dropped more than ``max_skip_ratio`` of the samples, naming the first reasons."""
    dropped, total = len(index["dropped"]), index["samples"] + len(index["dropped"])
    if total and dropped > max_skip_ratio * total:
        examples = "; ".join(f"{k}: {v}" for k, v in list(index["dropped"].items())[:3])
        raise ValueError(
            f"{dropped} of {total} samples were dropped, above --max-skip-ratio {max_skip_ratio} "
            f"(e.g. {examples}); check --image-root, or raise the ratio; nothing was written to {final}"
        )


def _write_shards(
    items: Iterator[tuple[dict, list[tuple[str, bytes | str | None]]]],
    out_dir: Path,
    samples_per_shard: int,
    source: str,
) -> dict:
    """The writing loop of :func:`write_shards`, into ``out_dir``."""
    shards: list[dict] = []
    dropped: dict[str, str] = {}
    pending: list[tuple[str, bytes]] = []
    key = 0

    def flush() -> None:
        data = _shard_bytes(pending)
        name = f"shard-{len(shards):06d}.tar"
        (out_dir / name).write_bytes(data)
        count = sum(member.endswith(".json") for member, _ in pending)
        shards.append(
            {"file": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        )
        pending.clear()

    for record, images in tqdm(items, desc=f"shard {out_dir.name}", unit="sample", mininterval=1):
        sample_id = str(record.get("id", f"#{key}")) if isinstance(record, dict) else f"#{key}"
        missing = [name for name, data in images if data is None]
        refused = [data for _, data in images if isinstance(data, str)]
        if missing or refused:
            dropped[sample_id] = "; ".join(refused) or f"missing image(s) {', '.join(missing)}"
            continue
        stem = f"{key:09d}"
        members = [f"{stem}.{i}{Path(name).suffix.lower() or '.img'}" for i, (name, _) in enumerate(images)]
        stored = dict(record) if isinstance(record, dict) else {"id": sample_id, "record": record}
        if images:
            column = "image" if "image" in stored else "images"
            stored[column] = members if isinstance(stored[column], list) else members[0]
        try:
            encoded = json.dumps(stored, ensure_ascii=False, sort_keys=True).encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate cannot be stored as UTF-8
            dropped[sample_id] = f"bad_text: the record is not valid Unicode ({err.reason})"
            continue
        pending.append((f"{stem}.json", encoded))
        pending += [(member, data) for member, (_, data) in zip(members, images, strict=True)]
        key += 1
        if key % samples_per_shard == 0:
            flush()
    if pending:
        flush()
    index = {"format": FORMAT, "source": source, "samples": key, "shards": shards, "dropped": dropped}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False), encoding="utf-8")
    return index
