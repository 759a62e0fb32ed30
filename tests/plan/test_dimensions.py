"""Model dimensions for the planner (``plan.dimensions``): exact parameter counts per part, from the
tiny recipe, from LlavaNext and component config folders, and for the ndino-8b preset."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_ndino.config import load_config
from llava_ndino.model.loading import build_model
from llava_ndino.plan.dimensions import PRESETS, model_shape
from llava_ndino.train.parts import part_modules


def _real_part_counts(model) -> dict[str, int]:
    return {part: sum(p.numel() for p in params) for part, params in part_modules(model).items()}


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.tiny.hidden_size=96", "model.tiny.layers=3", "model.tiny.vision_hidden_size=48"]],
)
def test_tiny_counts_equal_the_real_model(overrides):
    cfg = load_config(["recipe=demo", *overrides])
    model, _ = build_model(cfg.model, cfg.seed)
    assert model_shape(cfg).part_params() == _real_part_counts(model)


def test_llava_and_component_folders_count_exactly(tmp_path):
    cfg = load_config(["recipe=demo"])
    model, _ = build_model(cfg.model, cfg.seed)
    model.config.save_pretrained(tmp_path / "llava")
    llava = load_config(["recipe=demo", "model.source=llava", f"model.llava={tmp_path / 'llava'}"])
    assert model_shape(llava).part_params() == _real_part_counts(model)

    vision_cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2)
    llm_cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, vocab_size=500)
    vision_cfg.save_pretrained(tmp_path / "vision")
    llm_cfg.save_pretrained(tmp_path / "llm")
    parts = model_shape(
        load_config(["recipe=demo", "model.source=components", f"model.vision={tmp_path / 'vision'}",
                     f"model.llm={tmp_path / 'llm'}"])
    ).part_params()  # fmt: skip
    with torch.device("meta"):
        llm_cfg.vocab_size += 2  # assembly adds <image> and <pad>
        expected_llm = sum(p.numel() for p in LlamaForCausalLM(llm_cfg).parameters())
        expected_vision = sum(p.numel() for p in CLIPVisionModel(vision_cfg).parameters())
    assert parts["llm"] == expected_llm
    assert parts["vision"] == expected_vision
    assert parts["projector"] == 48 * 64 + 64 + 64 * 64 + 64


def test_ndino_8b_preset_counts():
    parts = PRESETS["ndino-8b"].part_params()
    assert parts["llm"] == 8_030_261_248 + 2 * 2 * 4096  # LLaMA-3-8B's published count + 2 added rows
    assert 8.02e9 < parts["llm"] < 8.04e9
    assert parts["vision"] == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert 3.0e8 < parts["vision"] < 3.1e8
    assert parts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert parts["newline"] == 4096
