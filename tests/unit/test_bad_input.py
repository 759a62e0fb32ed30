"""Bad input never crashes a run: a training run over deliberately broken samples completes and lists
every broken sample with its reason; `ndino data validate` finds the same ones before training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_ndino.cli import main
from llava_ndino.config import load_config
from llava_ndino.train.loop import train

EXIF_ORIENTATION = 0x0112


def _turns(question: str, answer: str = "Una figura colorata.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _image_sample(sample_id: str, image: str, question: str = "<image>\nCosa vedi?") -> dict:
    return {"id": sample_id, "image": image, "conversations": _turns(question)}


def write_broken_dataset(root: Path) -> tuple[Path, dict[str, str]]:
    """A LLaVA JSON with 8 good samples (odd image modes included) and 8 broken ones; returns the
    file and the expected {broken id: reason}."""
    images = root / "images"
    images.mkdir(parents=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    rgb.save(images / "rgb.jpg")
    rgb.convert("CMYK").save(images / "cmyk.jpg")
    rgb.convert("LA").save(images / "la.png")
    rgb.convert("P").save(images / "palette.png")
    Image.fromarray((np.arange(60 * 90).reshape(60, 90) * 7).astype(np.uint16)).save(images / "sixteen.png")
    exif = rgb.getexif()
    exif[EXIF_ORIENTATION] = 6
    rgb.save(images / "rotated.jpg", exif=exif)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    Image.new("RGB", (700, 700), "white").save(images / "bomb.png")  # above data.max_pixels=400000

    good = [
        _image_sample(f"good_{name}", f"{name}")
        for name in ("rgb.jpg", "cmyk.jpg", "la.png", "palette.png", "sixteen.png", "rotated.jpg")
    ]
    good += [
        {"id": "good_text", "conversations": _turns("Ciao, come stai?", "Bene, grazie.")},
        _image_sample("good_rgb_again", "rgb.jpg", "Guarda.\n<image>\nDi che colore è?"),
    ]
    broken = {
        "corrupt": ("unreadable_image", _image_sample("corrupt", "corrupt.jpg")),
        "truncated_jpeg": ("unreadable_image", _image_sample("truncated_jpeg", "truncated.jpg")),
        "missing": ("missing_image", _image_sample("missing", "nowhere.jpg")),
        "bomb": ("image_too_large", _image_sample("bomb", "bomb.png")),
        "malformed": ("malformed", {"id": "malformed", "conversations": [{"from": "human"}]}),
        "count": ("image_count_mismatch", _image_sample("count", "rgb.jpg", "<image>\nE questa?\n<image>")),
        "no_answer": (
            "no_assistant",
            {"id": "no_answer", "conversations": [{"from": "human", "value": "Ciao"}]},
        ),
        "cut_image": (
            "truncated_image",
            _image_sample("cut_image", "rgb.jpg", "parola " * 700 + "\n<image>"),
        ),
    }
    records = good + [record for _, record in broken.values()]
    path = root / "data.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path, {name: reason for name, (reason, _) in broken.items()}


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    return write_broken_dataset(tmp_path_factory.mktemp("broken"))


def _overrides(path: Path, out: Path) -> list[str]:
    return [
        "recipe=demo",
        f"output_dir={out}",
        "model.tiny.hidden_size=64",
        "data.synthetic.kind=null",
        f"data.path={path}",
        f"data.image_root={path.parent / 'images'}",
        "data.max_length=512",
        "data.max_pixels=400000",
        "data.max_skip_ratio=0.6",
    ]


def test_training_over_broken_samples_completes_and_lists_them(broken, tmp_path: Path) -> None:
    path, expected = broken
    cfg = load_config(
        [
            *_overrides(path, tmp_path / "run"),
            "train.max_steps=4",
            "train.per_device_batch_size=4",
            "train.log_every=1",
            "train.save_every=100",
        ]
    )
    result = train(cfg)
    assert result.status == "completed" and result.step == 4
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert {row["id"]: row["reason"] for row in listed} == expected
    assert len(listed) == len(expected), "one epoch: every broken sample listed once"
    assert all(row["id"] in row["message"] for row in listed)


def test_training_aborts_above_max_skip_ratio(broken, tmp_path: Path) -> None:
    path, _ = broken
    overrides = [
        *_overrides(path, tmp_path / "run"),
        "data.max_skip_ratio=0.2",
        "train.max_steps=4",
        "train.per_device_batch_size=4",
    ]
    with pytest.raises(RuntimeError, match=r"max_skip_ratio=0.2; see .*skipped.jsonl"):
        train(load_config(overrides))


@pytest.mark.parametrize("decode", [False, True])
def test_validate_reports_the_broken_samples(broken, tmp_path: Path, capsys, decode: bool) -> None:
    path, expected = broken
    out = tmp_path / "report"
    args = [
        "data",
        "validate",
        str(path),
        "--out",
        str(out),
        "--image-root",
        str(path.parent / "images"),
        "--recipe",
        "demo",
        "data.max_length=512",
        "data.max_pixels=400000",
        "model.tiny.hidden_size=64",
    ]
    assert main(args + (["--decode"] if decode else [])) == 0
    summary = json.loads((out / "summary.json").read_text())
    rejected = {
        row["id"]: row["reason"] for row in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())
    }
    if not decode:  # a truncated JPEG has a valid header: only decoding finds it
        expected = {k: v for k, v in expected.items() if k != "truncated_jpeg"}
    assert rejected == expected
    assert summary["samples"] == 16 and summary["usable"] == 16 - len(expected)
    assert summary["text_only"] == 1 and summary["images"]["count"] == 7 + (0 if decode else 1)
    assert sum(summary["tokens_histogram"]["counts"]) == summary["usable"]
    assert Image.open(out / "lengths.png").size == (800, 420)
    assert "rejected:" in capsys.readouterr().out


def test_streamed_shards_skip_the_same_broken_samples(broken, tmp_path: Path) -> None:
    path, expected = broken
    images = str(path.parent / "images")
    shard = [
        "data",
        "shard",
        str(path),
        str(tmp_path / "shards"),
        "--image-root",
        images,
        "--samples-per-shard",
        "4",
    ]
    assert main(shard) == 0
    streamed = [f"data.path={tmp_path / 'shards'}", "data.shuffle_buffer=1", "train.max_steps=4"]
    result = train(
        load_config([*_overrides(path, tmp_path / "run"), *streamed, "train.per_device_batch_size=4"])
    )
    assert result.status == "completed"
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    dropped_when_sharding = {"missing"}  # 15 samples streamed in order: one pass and one more
    assert {row["id"]: row["reason"] for row in listed} == {
        k: v for k, v in expected.items() if k not in dropped_when_sharding
    }


def test_validate_builds_the_assembled_processor_without_loading_weights(tiny_dirs, tmp_path: Path) -> None:
    from llava_ndino.config import ModelConfig
    from llava_ndino.data.lengths import LengthEstimator
    from llava_ndino.model.build import assemble_from_folders
    from llava_ndino.prep.validate import load_processor

    config = ModelConfig(source="components", vision=str(tiny_dirs["vision"]), llm=str(tiny_dirs["llm"]))
    light = load_processor(config)
    _, assembled = assemble_from_folders(str(tiny_dirs["vision"]), tiny_dirs["llm"])
    Image.new("RGB", (500, 300)).save(tmp_path / "photo.jpg")
    record = _image_sample("p", "photo.jpg", "<image>\nDescrivi la foto, per favore.")
    lengths = [
        LengthEstimator(p, "llama3", 8192, tmp_path).measure(record).length for p in (light, assembled)
    ]
    assert lengths[0] == lengths[1] > 1000
    assert light.tokenizer.pad_token_id == assembled.tokenizer.pad_token_id
    assert light.image_processor.to_dict() == assembled.image_processor.to_dict()
