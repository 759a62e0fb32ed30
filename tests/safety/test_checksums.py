"""Checkpoints record the SHA-256 of every file; a resume and an export verify what they read, so a
same-size corrupted file is refused instead of poisoning every later step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import (
    COMPLETE_FILE,
    OPTIMIZER_FILE,
    CheckpointError,
    file_sha256,
    latest_checkpoint,
    load_model_weights,
)
from llava_ndino.train.loop import train

BASE = ["recipe=demo", "model.tiny.hidden_size=64", "data.synthetic.image_size=112", "train.cpu_threads=1"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    train(load_config([*BASE, f"output_dir={run}", "train.max_steps=2", "train.save_every=2"]))
    return run


def test_complete_records_the_sha256_of_every_file(run: Path) -> None:
    checkpoint = latest_checkpoint(run)
    manifest = json.loads((checkpoint / COMPLETE_FILE).read_text())
    assert manifest["sha256"].keys() == manifest["files"].keys()
    for name, digest in manifest["sha256"].items():
        assert file_sha256(checkpoint / name) == digest


def test_a_same_size_corrupted_optimizer_state_refuses_the_resume(run: Path) -> None:
    _flip_a_byte(latest_checkpoint(run) / OPTIMIZER_FILE)
    with pytest.raises(CheckpointError, match=f"{OPTIMIZER_FILE} does not match the SHA-256"):
        train(load_config([*BASE, f"output_dir={run}", "train.max_steps=3", "train.save_every=2"]))


def test_a_corrupted_model_file_is_refused_by_export_and_init_from(run: Path) -> None:
    checkpoint = latest_checkpoint(run)
    _flip_a_byte(checkpoint / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not match"):
        load_model_weights(checkpoint)


def test_checkpoints_from_before_checksums_still_resume(run: Path) -> None:
    checkpoint = latest_checkpoint(run)
    manifest = json.loads((checkpoint / COMPLETE_FILE).read_text())
    del manifest["sha256"]
    (checkpoint / COMPLETE_FILE).write_text(json.dumps(manifest))
    result = train(load_config([*BASE, f"output_dir={run}", "train.max_steps=3", "train.save_every=2"]))
    assert result.step == 3
