"""Loading a run config (``llava_ndino.config``): typed overrides, errors that name the key and the
closest valid one, missing and out-of-range values, the resolved config round trip and the generated
key reference."""

import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from llava_ndino.config import (
    RecipeError,
    RunConfig,
    describe_config,
    load_config,
    save_resolved_config,
)


def _leaf_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted names of every non-section field of ``cls``."""
    keys = []
    for f in fields(cls):
        if is_dataclass(f.type):
            keys += _leaf_keys(f.type, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` and return it."""
    path.write_text(text)
    return path


def test_overrides_are_typed():
    cfg = load_config(
        [
            "recipe=demo",
            "train.max_steps=10",
            "train.lr=3e-4",
            "train.weight_decay=1",
            "train.trainable=[projector,llm]",
            "train.gradient_checkpointing=true",
            "data.synthetic.kind=null",
            "data.path=data/train.jsonl",
            "model.source=components",
            "model.vision=openclip:ViT-B-16:openai",
            "output_dir=runs/x",
        ]
    )
    assert cfg.train.max_steps == 10 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == pytest.approx(3e-4) and type(cfg.train.lr) is float
    assert cfg.train.weight_decay == 1.0 and type(cfg.train.weight_decay) is float
    assert cfg.train.trainable == ["projector", "llm"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.data.synthetic.kind is None
    assert cfg.data.path == "data/train.jsonl"
    assert cfg.model.vision == "openclip:ViT-B-16:openai"
    assert cfg.output_dir == "runs/x"


def test_later_override_wins():
    cfg = load_config(["recipe=demo", "train.max_steps=10", "train.max_steps=20"])
    assert cfg.train.max_steps == 20


@pytest.mark.parametrize(
    ("token", "key"),
    [("train.max_steps=abc", "train.max_steps"), ("train.lr=null", "train.lr"), ("train.trainable=llm", "")],
)
def test_badly_typed_override_is_an_error(token: str, key: str):
    with pytest.raises(RecipeError, match=re.escape(token)) as info:
        load_config(["recipe=demo", token])
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("token", "unknown", "closest"),
    [
        ("train.max_step=10", "train.max_step", "train.max_steps"),
        ("lr=1e-3", "lr", "train.lr"),
        ("model.sorce=tiny", "model.sorce", "model.source"),
        ("train.lr.peak=1", "train.lr.peak", "train.lr"),
    ],
)
def test_unknown_override_key_names_the_closest(token: str, unknown: str, closest: str):
    with pytest.raises(RecipeError, match=re.escape(f"unknown key '{unknown}'")) as info:
        load_config(["recipe=demo", token])
    assert f"did you mean '{closest}'?" in str(info.value)


def test_unknown_yaml_key_names_file_and_closest(tmp_path: Path):
    recipe = _write(tmp_path / "bad.yaml", "output_dir: runs/x\ntrain:\n  max_step: 5\n")
    with pytest.raises(RecipeError, match=re.escape("unknown key 'train.max_step'")) as info:
        load_config([f"recipe={recipe}"])
    assert str(recipe) in str(info.value)
    assert "did you mean 'train.max_steps'?" in str(info.value)


def test_missing_max_steps_says_which_override_to_add(tmp_path: Path):
    recipe = _write(tmp_path / "no_steps.yaml", "output_dir: runs/x\n")
    with pytest.raises(RecipeError, match="missing required") as info:
        load_config([f"recipe={recipe}"])
    assert "train.max_steps=" in str(info.value)


def test_missing_output_dir_says_which_override_to_add(tmp_path: Path):
    recipe = _write(tmp_path / "no_output.yaml", "train:\n  max_steps: 3\n")
    with pytest.raises(RecipeError, match="output_dir="):
        load_config([f"recipe={recipe}"])


def test_token_without_equals_explains_the_syntax():
    with pytest.raises(RecipeError, match="key=value"):
        load_config(["recipe=demo", "train.max_steps"])


@pytest.mark.parametrize("args", [["train.max_steps=1"], ["recipe=no_such_recipe"]])
def test_missing_or_unknown_recipe_lists_the_available_ones(args: list[str]):
    with pytest.raises(RecipeError, match="available recipes") as info:
        load_config(args)
    assert "demo" in str(info.value)


@pytest.mark.parametrize(
    ("token", "value", "allowed"),
    [
        ("model.source=huge", "'huge'", "components, llava, tiny, causal_lm"),
        ("train.trainable=[projector,lora]", "'lora'", "projector, vision, llm, newline"),
        ("train.schedule=step", "'step'", "cosine, linear, constant"),
    ],
)
def test_invalid_choice_names_key_value_and_allowed(token: str, value: str, allowed: str):
    key = token.split("=")[0]
    with pytest.raises(RecipeError, match=re.escape(f"invalid value {value} for '{key}'")) as info:
        load_config(["recipe=demo", token])
    assert allowed in str(info.value)


def test_out_of_range_value_is_an_error():
    with pytest.raises(RecipeError, match="train.max_steps"):
        load_config(["recipe=demo", "train.max_steps=0"])


@pytest.mark.parametrize("patch", [0, 30])
def test_tiny_patch_must_divide_the_tile(patch: int):
    with pytest.raises(RecipeError, match=re.escape(f"model.tiny.patch_size={patch} must divide")):
        load_config(["recipe=demo", f"model.tiny.patch_size={patch}"])


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(["recipe=demo", "train.max_steps=7", "train.lr_vision=1e-4", "model.vision=null"])
    path = save_resolved_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    reloaded = load_config([f"recipe={path}"])
    assert reloaded == cfg
    assert reloaded.recipe == "demo"


def test_describe_config_documents_every_key():
    text = describe_config()
    for key in _leaf_keys():
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:")), None)
        assert line is not None, f"{key} missing from describe_config()"
        doc = text.splitlines()[text.splitlines().index(line) + 1].strip()
        assert doc, f"{key} has no docstring"
    assert "train.max_steps: int | None = null" in text and "exactly one of the two is required" in text
    assert "[components|llava|tiny|causal_lm]" in text
