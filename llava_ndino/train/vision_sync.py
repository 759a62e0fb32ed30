"""Keep every rank's vision path identical under data parallelism (``docs/design.md#data-parallel-pitfalls``).

Two things make ranks disagree about which parameters a step touches:

* a micro-batch without images skips the vision tower, the projector and ``image_newline``; under
  ZeRO-3 the other ranks then wait forever in all-gathers this rank never joins, and DDP waits for
  gradients that never come. :func:`install_vision_keepalive` runs that path on a dummy image
  whose output is multiplied by zero, at the same point of the forward pass as a real image
  (after the token embeddings, before the language model), so collectives stay in order.
* LLaVA reads the tower's penultimate layer, so the last encoder layer and ``post_layernorm`` never
  get gradients on any rank. :func:`freeze_unused_vision_layers` freezes them, which also makes the
  trainable-parameter count honest.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

log = logging.getLogger(__name__)


def freeze_unused_vision_layers(model: nn.Module) -> int:
    """Freeze the CLIP layers after ``vision_feature_layer`` and ``post_layernorm``; return how many parameters."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):  # several layers are read: the deepest one bounds what is used
        layer = max(layer, key=lambda index: index % (config.vision_config.num_hidden_layers + 1))
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # transformers 4 nests the CLIP body one level deeper
    depth = len(tower.encoder.layers)
    used = layer % (depth + 1)  # hidden_states[0] is the embeddings, hidden_states[i] follows layer i
    unused = [*tower.encoder.layers[used:], tower.post_layernorm]
    frozen = 0
    for module in unused:
        for param in module.parameters():
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    if frozen:
        log.info(
            "froze %d vision parameters after feature layer %d: they never receive gradients", frozen, layer
        )
    return frozen


def install_vision_keepalive(model: nn.Module) -> None:
    """Make every forward pass run the vision path, on a zero-weighted dummy image when it has none.

    Register this before the engine wraps the model so the hook runs ahead of the engine's own
    pre-forward hooks on the language model.
    """
    inner = model.model
    config = model.config
    state = {"images": False}

    def note_images(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixel_values = kwargs.get("pixel_values")
        state["images"] = pixel_values is not None and pixel_values.size(0) > 0

    def add_dummy_vision(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("inputs_embeds")
        if state["images"] or embeds is None or not torch.is_grad_enabled():
            return None
        side = config.vision_config.image_size
        sizes = torch.tensor([[side, side]], device=embeds.device)
        tiles = image_size_to_num_patches((side, side), config.image_grid_pinpoints, side)
        pixels = torch.zeros(1, tiles, 3, side, side, device=embeds.device, dtype=embeds.dtype)
        features = inner.get_image_features(
            pixels,
            sizes,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        zero = sum(feature.sum() for feature in features) * 0.0
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs

    inner.register_forward_pre_hook(note_images, with_kwargs=True)
    inner.language_model.register_forward_pre_hook(add_dummy_vision, with_kwargs=True)
