"""The trainable parts of a LlavaNext model (vision, projector, llm, newline): freezing by part and
AdamW parameter groups with per-part learning rates."""

from __future__ import annotations

import logging

from torch import nn
from transformers import LlavaNextForConditionalGeneration

from llava_ndino.config import TrainConfig
from llava_ndino.model.build import (
    describe_parameters,
)

log = logging.getLogger(__name__)

PARTS = ("vision", "projector", "llm", "newline")


def part_modules(model: LlavaNextForConditionalGeneration) -> dict[str, list[nn.Parameter]]:
    """Return the parameters of each trainable part: vision, projector, llm (incl. lm_head), newline."""
    inner = model.model
    return {
        "vision": list(inner.vision_tower.parameters()),
        "projector": list(inner.multi_modal_projector.parameters()),
        "llm": list(inner.language_model.parameters()) + list(model.lm_head.parameters()),
        "newline": [inner.image_newline],
    }


def apply_trainable(model: LlavaNextForConditionalGeneration, trainable: list[str]) -> None:
    """Freeze every part not in ``trainable`` and log the trainable/frozen parameter table."""
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    for name, params in part_modules(model).items():
        for param in params:
            param.requires_grad_(name in trainable)
    log.info("parameters by part:\n%s", describe_parameters(model))


def param_groups(model: LlavaNextForConditionalGeneration, cfg: TrainConfig) -> list[dict]:
    """AdamW groups per part (vision/projector may have their own lr); no weight decay on 1-D params."""
    lrs = {"vision": cfg.lr_vision or cfg.lr, "projector": cfg.lr_projector or cfg.lr}
    groups = []
    seen: set[int] = set()
    for name, params in part_modules(model).items():
        live = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in live)
        for decay in (True, False):
            chosen = [p for p in live if (p.ndim >= 2) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lrs.get(name, cfg.lr),
                        "weight_decay": cfg.weight_decay if decay else 0.0,
                        "name": f"{name}{'' if decay else '_no_decay'}",
                    }
                )
    if not groups:
        raise ValueError("nothing to train: train.trainable selects no parameters")
    return groups
