"""Configuration: values that used to fail late (or never) are refused when the config loads, and keys
that conflict or have no effect are errors that say why."""

from __future__ import annotations

import pytest

from llava_ndino.config import RecipeError, load_config
from llava_ndino.config.rules import RANGES

DEMO = ["recipe=demo", "output_dir=unused"]


@pytest.mark.parametrize(
    "override",
    [
        "train.save_every=0",  # ZeroDivisionError after step 1
        "train.log_every=0",
        "train.keep_last=-1",  # failed at the first save, after the work
        "train.lr=-1e-4",
        "train.lr=nan",  # completed a run of NaN weights
        "train.lr=inf",
        "train.lr_vision=nan",
        "train.max_grad_norm=0",
        "train.cpu_threads=-2",
        "data.max_skip_ratio=1.0",  # looped forever on unusable data
        "data.max_skip_ratio=-0.1",
        "train.weight_decay=-1",
        "dpo.beta=0",
    ],
)
def test_late_failing_values_are_refused_at_load(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(RecipeError, match=f"'{key}': must be a finite number in "):
        load_config([*DEMO, override])


def test_every_bound_is_well_formed_and_the_defaults_respect_it() -> None:
    for key, interval in RANGES.items():
        assert interval[0] in "[(" and interval[-1] in "])" and interval.count(",") == 1, key
    load_config(DEMO)  # the demo recipe's own values pass


def test_data_path_beside_the_demos_synthetic_data_is_a_conflict() -> None:
    """`recipe=demo data.path=FILE` used to train on the synthetic shapes without a word."""
    with pytest.raises(
        RecipeError, match=r"data.synthetic.kind and data.path are both set.*data.synthetic.kind=null"
    ):
        load_config([*DEMO, "data.path=train.json"])
    cfg = load_config([*DEMO, "data.path=train.json", "data.synthetic.kind=null"])
    assert cfg.data.path == "train.json" and cfg.data.synthetic.kind is None


def test_lora_on_a_vlm_recipe_is_an_error() -> None:
    """`lora.enabled=true` on a VLM recipe used to train every weight."""
    with pytest.raises(RecipeError, match="LoRA/QLoRA adapters are trained for the text objectives"):
        load_config([*DEMO, "lora.enabled=true"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.tiny.layers=4", "model.source=llava", "model.llava=x"], "model.tiny.layers"),
        (["model.llava=x"], "model.llava"),
        (["dpo.beta=0.5"], "dpo.beta"),
        (["data.synthetic.kind=null", "data.path=x", "data.synthetic.train=5"], "data.synthetic.train"),
    ],
)
def test_a_key_you_set_that_has_no_effect_is_an_error(overrides: list[str], named: str) -> None:
    with pytest.raises(RecipeError, match=f"{named} would have no effect"):
        load_config([*DEMO, *overrides])


def test_text_objective_needs_a_causal_lm_source() -> None:
    with pytest.raises(RecipeError, match="text objectives .* train model.source=causal_lm"):
        load_config([*DEMO, "objective=clm"])


def test_a_recipes_own_alternatives_are_not_errors() -> None:
    """short_it carries model.llava for the from-LLaVA-NeXT start while model.source=components."""
    cfg = load_config(["recipe=short_it", "output_dir=unused"])
    assert cfg.model.source == "components" and cfg.model.llava
