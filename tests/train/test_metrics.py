"""The FLOPs count behind MFU: torchtitan's formula on a tiny VLM, and the same count under ZeRO-3."""

from __future__ import annotations

import torch

from llava_ndino.config import load_config
from llava_ndino.model.loading import build_model
from llava_ndino.train.metrics import flops_per_step

TINY = ["recipe=demo", "output_dir=unused", "model.tiny.hidden_size=64"]


def _batch(tiles: int = 3) -> dict[str, torch.Tensor]:
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return {"attention_mask": mask, "pixel_values": torch.zeros(2, tiles, 3, 112, 112)}


def test_flops_follow_the_formula_and_survive_zero3_partitioning() -> None:
    model, _ = build_model(load_config(TINY).model, seed=0)
    inner, text = model.model, model.config.get_text_config()
    n_lm = sum(p.numel() for p in inner.language_model.parameters()) + model.lm_head.weight.numel()
    n_lm -= inner.language_model.get_input_embeddings().weight.numel()
    n_vit = sum(p.numel() for p in inner.vision_tower.parameters())
    tokens, row = 17, 10
    attention = 12 * text.num_hidden_layers * text.hidden_size * tokens * row
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    expected = 6 * n_lm * tokens + attention + 6 * n_vit * patches * 2 * 3  # the tower trains in the demo
    assert flops_per_step(model, _batch()) == expected

    for param in model.parameters():  # what DeepSpeed ZeRO-3 leaves on a rank: an empty shard and ds_numel
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert flops_per_step(model, _batch()) == expected
