"""Records that used to crash `ndino data validate` and `ndino data shard`: an over-long image path,
a lone surrogate, an image given as a number, a PNG text-chunk bomb. Each is reported per sample
with a reason, as training skips it; no command dies or leaves a half-written output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from llava_ndino.cli import main
from llava_ndino.prep.shards import llava_items, write_shards


def _turns(question: str = "<image>\nCosa vedi?") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "Un quadrato."}]


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A LLaVA JSON file of one good sample and four hostile ones, with the reasons they must get."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48), "blue").save(images / "good.png")
    info = PngInfo()
    info.add_text("comment", "x" * 30_000_000, zip=True)  # decompresses far past PIL's chunk limit
    Image.new("RGB", (8, 8)).save(images / "bomb.png", pnginfo=info)
    records = [
        {"id": "good", "image": "good.png", "conversations": _turns()},
        {"id": "long-path", "image": "a" * 5000 + ".png", "conversations": _turns()},
        {"id": "surrogate", "image": "good.png", "conversations": _turns("<image>\nCosa \udc80 vedi?")},
        {"id": "number", "image": 12345, "conversations": _turns()},
        {"id": "bomb", "image": "bomb.png", "conversations": _turns()},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    expected = {
        "long-path": "bad_image_path",
        "surrogate": "bad_text",
        "number": "malformed",
        "bomb": "unreadable_image",
    }
    return path, expected


@pytest.mark.parametrize("decode", [False, True])
def test_validate_reports_each_hostile_record(hostile, tmp_path: Path, decode: bool) -> None:
    path, expected = hostile
    out = tmp_path / "report"
    args = ["data", "validate", str(path), "--out", str(out), "--image-root", str(path.parent / "images")]
    args += ["--recipe", "demo", "model.tiny.hidden_size=64", *(["--decode"] if decode else [])]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {row["id"]: row["reason"] for row in rows} == expected


def test_shard_writer_drops_each_hostile_record(hostile, tmp_path: Path) -> None:
    path, expected = hostile
    index = write_shards(
        llava_items(path, path.parent / "images"), tmp_path / "shards", 10, max_skip_ratio=0.9
    )
    reasons = {key: why.split(":")[0] for key, why in index["dropped"].items()}
    assert index["samples"] == 2  # good, and bomb: shards store bytes, the reader refuses the bomb later
    assert reasons == {"long-path": "bad_image_path", "surrogate": "bad_text", "number": "malformed"}
    assert (tmp_path / "shards" / "index.json").is_file()
