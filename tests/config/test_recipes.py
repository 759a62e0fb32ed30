"""The shipped recipes: each loads on its own and is listed with its description, every knob is
commented, the demo and the NDiNO stage recipes carry their settings, and model folders follow
NDINO_MODELS."""

from __future__ import annotations

import re
from operator import attrgetter
from pathlib import Path

import pytest
import yaml

from llava_ndino.config import RunConfig, list_recipes, load_config, recipes_dir
from tests.integration.test_text_recipes import RECIPES as TEXT_RECIPES

RECIPE_FILES = sorted(recipes_dir().glob("*.yaml"))
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w.]*)\s*:(.*)$")
STAGES = ["align", "adapt", "short_it", "long_it"]
ALL_PARTS = ["vision", "projector", "llm", "newline"]
# The NDiNO release scripts' settings, per stage (the stages of docs/design.md)
EXPECTED = {
    "align": {
        "train.trainable": ["projector"],
        "train.lr": 1e-3,
        "data.template": "plain",
        "data.mixture": "align",
        "engine": "zero2",
        "init_from": None,
    },
    "adapt": {
        "train.trainable": ALL_PARTS,
        "train.lr": 1e-5,
        "train.lr_vision": 2e-6,
        "train.per_device_batch_size": 2,
        "train.grad_accum": 8,
        "train.schedule": "cosine",
        "train.warmup_ratio": 0.03,
        "train.weight_decay": 0.0,
        "train.gradient_checkpointing": True,
        "data.max_length": 8192,
        "data.template": "plain",
        "data.mixture": "adapt",
        "model.dtype": "bfloat16",
        "engine": "zero3",
        "init_from": "runs/align",
    },
    "short_it": {
        "train.trainable": ALL_PARTS,
        "data.template": "llama3",
        "data.mixture": "short_it",
        "engine": "zero3",
        "init_from": "runs/adapt",
    },
    "long_it": {
        "train.trainable": ALL_PARTS,
        "train.max_steps": 500,
        "train.per_device_batch_size": 4,
        "train.grad_accum": 4,
        "train.lr": 1e-5,
        "train.lr_vision": 2e-6,
        "data.template": "llama3",
        "data.mixture": "long_it",
        "engine": "zero3",
        "init_from": "runs/short_it",
    },
}


def test_recipes_dir_is_in_the_package_and_linked_from_the_repo():
    assert recipes_dir().parent.name == "llava_ndino"
    repo_link = Path(__file__).resolve().parents[2] / "recipes"
    assert repo_link.is_symlink()
    assert repo_link.resolve() == recipes_dir()


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(path: Path) -> None:
    """No override needed: each recipe sets its own output_dir and train.max_steps."""
    cfg = load_config([f"recipe={path.stem}"])
    assert isinstance(cfg, RunConfig) and cfg.recipe == path.stem
    assert cfg.description and cfg.output_dir and cfg.train.max_steps >= 1


def test_list_recipes_names_every_recipe_with_its_description() -> None:
    recipes = list_recipes()
    assert recipes == sorted(recipes)
    listed = dict(recipes)
    assert sorted(listed) == sorted(path.stem for path in RECIPE_FILES)
    assert all(listed.values()), "every recipe has a description"
    description = yaml.safe_load((recipes_dir() / "demo.yaml").read_text())["description"]
    assert listed["demo"] == description


def test_every_text_recipe_is_trained_by_the_integration_tests() -> None:
    """The recipes with a text objective are exactly those tests/integration/test_text_recipes.py trains."""
    text = [name for name, _ in list_recipes() if load_config([f"recipe={name}"]).objective != "vlm_sft"]
    assert sorted(text) == sorted(TEXT_RECIPES)


def test_demo_recipe_values():
    cfg = load_config(["recipe=demo"])
    assert cfg.output_dir == "runs/demo"
    assert cfg.model.source == "tiny"
    assert cfg.data.synthetic.kind == "shapes"
    assert cfg.train.trainable == ["projector", "newline", "llm", "vision"]
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.synthetic.image_size == cfg.model.tiny.tile_size == 112


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_knob_has_a_comment(path: Path):
    lines = path.read_text().splitlines()
    content = [i for i, ln in enumerate(lines) if ln.strip() and not ln.strip().startswith("#")]
    for position, i in enumerate(content):
        match = KEY_LINE.match(lines[i])
        if not match:
            continue
        indent, key, rest = match.groups()
        value = rest.split(" #")[0].strip()
        following = lines[content[position + 1]] if position + 1 < len(content) else ""
        opens_section = not value and len(following) - len(following.lstrip()) > len(indent)
        if opens_section and not following.strip().startswith("-"):
            continue
        commented = re.search(r"\s#", rest) or (i > 0 and lines[i - 1].strip().startswith("#"))
        assert commented, f"{path.name}:{i + 1}: key '{key}' has no # comment"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_recipe_carries_the_release_settings(stage: str) -> None:
    cfg = load_config([f"recipe={stage}"])
    got = {key: attrgetter(key)(cfg) for key in EXPECTED[stage]}
    assert got == EXPECTED[stage]
    assert cfg.model.source == "components" and cfg.objective == "vlm_sft"
    if stage != "align":  # every full fine-tuning stage shares the release's optimiser settings
        assert (cfg.train.lr, cfg.train.lr_vision, cfg.train.weight_decay) == (1e-5, 2e-6, 0.0)
        assert (cfg.train.schedule, cfg.train.warmup_ratio) == ("cosine", 0.03)
        assert (cfg.data.max_length, cfg.train.gradient_checkpointing) == (8192, True)


def test_model_folders_come_from_ndino_models(monkeypatch) -> None:
    monkeypatch.delenv("NDINO_MODELS", raising=False)
    assert load_config(["recipe=adapt"]).model.vision == "models/clip-vit-large-patch14-336"
    monkeypatch.setenv("NDINO_MODELS", "/shared/models")
    cfg = load_config(["recipe=long_it"])
    assert (cfg.model.vision, cfg.model.llm, cfg.model.llava) == (
        "/shared/models/clip-vit-large-patch14-336",
        "/shared/models/Meta-Llama-3-8B",
        "/shared/models/llama3-llava-next-8b-hf",
    )
