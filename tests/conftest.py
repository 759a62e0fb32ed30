"""Shared fixtures, built once per test session (no downloads): tiny model folders, a small shapes data
set and its manifest root, and a data set of deliberately broken samples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ndino.data.manifests import load_manifests
from llava_ndino.model.build import assemble_from_folders
from llava_ndino.model.tiny import FOLDER_SIZES, write_tiny
from llava_ndino.synthetic.shapes import write_shapes_dataset


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


@pytest.fixture(scope="session")
def shapes_json(tmp_path_factory) -> Path:
    """24 shapes samples (64x48 images) as a LLaVA JSON file beside its images folder."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 24, seed=3, width=64, height=48)


@pytest.fixture
def long_it_data_root(shapes_json, tmp_path, monkeypatch) -> Path:
    """An NDINO_DATA_ROOT whose llava_instruct_conv_58k_ita (the long_it mixture's one source) holds the
    shapes samples."""
    root = tmp_path / "root"
    long_it = load_manifests()["llava_instruct_conv_58k_ita"]
    (root / long_it.path).parent.mkdir(parents=True)
    (root / long_it.path).write_text(shapes_json.read_text())
    (root / long_it.image_root).parent.mkdir(parents=True)
    (root / long_it.image_root).symlink_to(shapes_json.parent)
    monkeypatch.setenv("NDINO_DATA_ROOT", str(root))
    return root


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


@pytest.fixture(scope="session")
def broken_dataset(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """``write_broken_dataset``'s file and its {broken id: reason}."""
    return write_broken_dataset(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def tiny_vlm():
    """(config, model, processor) of the demo recipe's tiny VLM at the test sizes, fresh per module."""
    from llava_ndino.config import load_config
    from llava_ndino.model.loading import build_model
    from tests.helpers import TINY_DEMO

    cfg = load_config(TINY_DEMO)
    model, processor = build_model(cfg.model, seed=0)
    return cfg, model, processor


@pytest.fixture(scope="module")
def text_tokenizers(tiny_dirs) -> dict:
    """The tiny LLaMA-3-style tokenizer prepared for llama3 and each text template (tokens and Jinja)."""
    from llava_ndino.formats.prompts import get_template
    from llava_ndino.model.peft_setup import prepare_tokenizer
    from tests.helpers import TEXT_TEMPLATES

    return {
        name: prepare_tokenizer(tiny_dirs["llm"], get_template(name)) for name in (*TEXT_TEMPLATES, "llama3")
    }
