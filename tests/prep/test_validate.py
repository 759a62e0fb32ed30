"""Data validation (``prep.validate``, `ndino data validate`): it finds the broken samples a training
run would skip, reads manifests and shards, and measures lengths with the assembled model's processor
without loading its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_ndino.cli import main
from llava_ndino.prep.shards import llava_items, write_shards


@pytest.mark.parametrize("decode", [False, True])
def test_validate_reports_the_broken_samples(broken_dataset, tmp_path: Path, capsys, decode: bool) -> None:
    path, expected = broken_dataset
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


def test_validate_builds_the_assembled_processor_without_loading_weights(tiny_dirs, tmp_path: Path) -> None:
    from llava_ndino.config import ModelConfig
    from llava_ndino.data.lengths import LengthEstimator
    from llava_ndino.model.build import assemble_from_folders
    from llava_ndino.prep.validate import load_processor

    config = ModelConfig(source="components", vision=str(tiny_dirs["vision"]), llm=str(tiny_dirs["llm"]))
    light = load_processor(config)
    _, assembled = assemble_from_folders(str(tiny_dirs["vision"]), tiny_dirs["llm"])
    Image.new("RGB", (500, 300)).save(tmp_path / "photo.jpg")
    question = "<image>\nDescrivi la foto, per favore."
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": "Una figura colorata."}]
    record = {"id": "p", "image": "photo.jpg", "conversations": turns}
    lengths = [
        LengthEstimator(p, "llama3", 8192, tmp_path).measure(record).length for p in (light, assembled)
    ]
    assert lengths[0] == lengths[1] > 1000
    assert light.tokenizer.pad_token_id == assembled.tokenizer.pad_token_id
    assert light.image_processor.to_dict() == assembled.image_processor.to_dict()


def test_validate_reads_a_manifest_and_a_shards_folder(
    long_it_data_root, shapes_json, tmp_path: Path
) -> None:
    """Besides a file, `ndino data validate` takes a manifest's name (under NDINO_DATA_ROOT) or shards."""
    write_shards(llava_items(shapes_json, None), tmp_path / "shards", 3, source=str(shapes_json))
    for target in ("llava_instruct_conv_58k_ita", str(tmp_path / "shards")):
        out = tmp_path / "report" / Path(target).name
        assert main(["data", "validate", target, "--out", str(out), "--recipe", "demo"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["usable"] == 24 and summary["images"]["count"] == 24 and summary["rejected"] == {}
