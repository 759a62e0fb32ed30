"""Trainable parts (``train.parts``): freezing by part name and the per-part learning rates and weight
decay of the optimiser's parameter groups."""

from __future__ import annotations

import pytest

from llava_ndino.train.parts import apply_trainable, param_groups


def test_freezing_and_per_part_learning_rates(tiny_vlm) -> None:
    cfg, model, _ = tiny_vlm
    apply_trainable(model, ["projector", "vision"])
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert not model.model.image_newline.requires_grad
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    train = cfg.train
    train.lr, train.lr_vision, train.weight_decay = 1e-5, 2e-6, 0.1
    groups = {g["name"]: g for g in param_groups(model, train)}
    assert set(groups) == {"vision", "vision_no_decay", "projector", "projector_no_decay"}
    assert groups["vision"]["lr"] == 2e-6 and groups["projector"]["lr"] == 1e-5
    assert groups["vision_no_decay"]["weight_decay"] == 0.0 and groups["vision"]["weight_decay"] == 0.1
    trainable = sum(p.numel() for g in groups.values() for p in g["params"])
    expected = sum(
        p.numel()
        for m in (model.model.vision_tower, model.model.multi_modal_projector)
        for p in m.parameters()
    )
    assert trainable == expected
    with pytest.raises(ValueError, match="unknown trainable"):
        apply_trainable(model, ["projecter"])
