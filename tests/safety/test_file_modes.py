"""Weights get the permissions the umask grants, like every other file a run or an export writes (safetensors
alone writes 0600, unreadable to the group on a shared cluster)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from llava_ndino.formats.tensor_files import save_safetensors, umask_mode
from tests.helpers import save_tiny_checkpoint


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_safetensors_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert _mode(tmp_path / "w.safetensors") == 0o640 == umask_mode()
    finally:
        os.umask(old)


def test_every_checkpoint_file_has_the_same_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_tiny_checkpoint(tmp_path, 1)
    finally:
        os.umask(old)
    assert {_mode(file) for file in path.iterdir()} == {0o644}
