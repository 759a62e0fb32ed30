"""Shared fixtures: tiny model folders built once per test session (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llava_ndino.model.build import assemble_from_folders
from llava_ndino.model.tiny import FOLDER_SIZES, write_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny vision/llm/openclip folders with 336 px tiles, as `ndino tiny` writes them."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), FOLDER_SIZES, seed=0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_dirs, tmp_path_factory) -> Path:
    """A LlavaNext folder assembled from the tiny folders, as `ndino assemble` writes it."""
    from llava_ndino.export.vlm import save_llava_folder

    torch.manual_seed(0)
    model, processor = assemble_from_folders(str(tiny_dirs["vision"]), tiny_dirs["llm"])
    return save_llava_folder(model, processor, tmp_path_factory.mktemp("llava") / "model")
