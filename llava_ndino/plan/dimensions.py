"""Model shapes for planning: exact parameter counts of a LlavaNext model (CLIP tower, mlp2x_gelu
projector, LLaMA-style LM) from HF configs, without building or loading weights.

Shapes come from the model folders' ``config.json`` files, from the tiny model a
``model.source=tiny`` recipe builds (on the meta device), or from the ``ndino-8b`` preset (CLIP
ViT-L/14-336 + LLaMA-3-8B) where the folders are missing. `ndino plan` sizes memory from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaNextConfig, PretrainedConfig

from llava_ndino.config import RunConfig


@dataclass(frozen=True)
class VisionShape:
    """A CLIP ViT vision tower (HF ``CLIPVisionModel``)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3

    @classmethod
    def from_config(cls, c: PretrainedConfig) -> VisionShape:
        """Read the shape from a ``CLIPVisionConfig``."""
        return cls(
            c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
            c.image_size, c.patch_size, c.num_channels,
        )  # fmt: skip

    @property
    def tokens_per_tile(self) -> int:
        """Patch tokens plus CLS per image tile (577 for ViT-L/14 at 336 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def layer_params(self) -> int:
        """Parameters of one encoder layer: attention with biases, 2 LayerNorms, the MLP."""
        h, i = self.hidden, self.intermediate
        return 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)

    def params(self) -> int:
        """Parameters of the tower: patch, CLS and position embeddings, pre/post LayerNorm, layers."""
        h = self.hidden
        embeddings = self.channels * self.patch_size**2 * h + h + self.tokens_per_tile * h
        return embeddings + 4 * h + self.layers * self.layer_params()


@dataclass(frozen=True)
class TextShape:
    """A LLaMA-style decoder (RMSNorm, GQA attention, SwiGLU MLP)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, c: PretrainedConfig, extra_tokens: int = 0) -> TextShape:
        """Read the shape from a causal-LM config; assembly adds ``extra_tokens`` embedding rows."""
        heads = c.num_attention_heads
        return cls(
            c.hidden_size, c.num_hidden_layers, heads, getattr(c, "num_key_value_heads", None) or heads,
            getattr(c, "head_dim", None) or c.hidden_size // heads, c.intermediate_size,
            c.vocab_size + extra_tokens, bool(getattr(c, "tie_word_embeddings", False)),
            bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False)),
        )  # fmt: skip

    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o projections, SwiGLU MLP, 2 RMSNorms."""
        h, i, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        return attention + 3 * h * i + (2 * i + h if self.mlp_bias else 0) + 2 * h

    def params(self) -> int:
        """Parameters of the causal LM: embeddings, layers, final norm and (unless tied) the head."""
        embedding = self.vocab * self.hidden
        return embedding * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


@dataclass(frozen=True)
class ModelShape:
    """The shapes the planner needs; ``vision`` is None for text-only causal LMs."""

    text: TextShape
    vision: VisionShape | None
    source: str
    """Where the shapes came from, shown in the output."""
    feature_layers: int = 1
    """Vision layers concatenated into the projector input (LlavaNext ``vision_feature_layer``)."""
    projector_bias: bool = True

    def part_params(self) -> dict[str, int]:
        """Parameter count of each trainable part: vision, projector, llm (with lm_head), newline."""
        if self.vision is None:
            return {"llm": self.text.params()}
        th, vh = self.text.hidden, self.vision.hidden * self.feature_layers
        projector = vh * th + th * th + 2 * th * int(self.projector_bias)
        return {
            "vision": self.vision.params(),
            "projector": projector,
            "llm": self.text.params(),
            "newline": th,
        }

    def largest_unit(self, parts: set[str]) -> int:
        """Parameters of the largest module among ``parts`` that ZeRO-3 gathers whole."""
        units = {
            "llm": max(self.text.vocab * self.text.hidden, self.text.layer_params()),
            "projector": self.part_params().get("projector", 0),
            "vision": self.vision.layer_params() if self.vision else 0,
        }
        return max((units.get(part, 0) for part in parts), default=0)


def ndino_8b_configs() -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The HF configs of openai/clip-vit-large-patch14-336's tower and meta-llama/Meta-Llama-3-8B."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14,
    )  # fmt: skip
    llm = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
    )  # fmt: skip
    return vision, llm


_NDINO_VISION, _NDINO_LLM = ndino_8b_configs()
PRESETS = {
    "ndino-8b": ModelShape(
        TextShape.from_config(_NDINO_LLM, extra_tokens=2),
        VisionShape.from_config(_NDINO_VISION),
        "preset ndino-8b: CLIP ViT-L/14-336 + mlp2x_gelu + LLaMA-3-8B with <image> and <pad> added",
    )
}
"""Built-in model shapes for planning without the model folders."""


def preset_shape(name: str) -> ModelShape:
    """Return the built-in shape ``name``, or a ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown model_preset {name!r}: choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def shape_from_llava_config(config: LlavaNextConfig, source: str) -> ModelShape:
    """Return the shape of an HF LlavaNext model from its config."""
    layers = config.vision_feature_layer
    return ModelShape(
        TextShape.from_config(config.text_config),
        VisionShape.from_config(config.vision_config),
        source,
        feature_layers=len(layers) if isinstance(layers, list) else 1,
        projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
    )


def model_shape(cfg: RunConfig, preset: str | None = None) -> ModelShape:
    """Return the shape of the model ``cfg`` trains: a named ``preset``, the tiny model, or the folders' configs.

    A missing folder (or an open_clip tower, which has no HF config) falls back to the ``ndino-8b``
    preset for that part, and the shape's ``source`` says so.
    """
    if preset:
        return preset_shape(preset)
    model, fallback = cfg.model, PRESETS["ndino-8b"]
    if model.source == "tiny":
        from llava_ndino.model.loading import build_model

        logging.disable(logging.INFO)  # building logs the embedding resize
        try:
            with torch.device("meta"):
                built, _ = build_model(model, cfg.seed)
        finally:
            logging.disable(logging.NOTSET)
        return shape_from_llava_config(built.config, "the tiny model the recipe builds (model.source=tiny)")
    if model.source == "llava":
        folder = _config_folder(model.llava)
        if folder is None:
            return replace(fallback, source=f"{fallback.source} (model.llava={model.llava} not found)")
        return shape_from_llava_config(LlavaNextConfig.from_pretrained(str(folder)), f"{folder}/config.json")
    llm_folder, vision_folder = _config_folder(model.llm), _config_folder(model.vision)
    text, notes = fallback.text, [f"llm: ndino-8b preset (model.llm={model.llm} not found)"]
    if llm_folder is not None:
        extra = 2 if model.source == "components" else 0  # assembly adds <image> and <pad>
        text = TextShape.from_config(AutoConfig.from_pretrained(str(llm_folder)), extra)
        notes = [f"llm: {llm_folder}/config.json"]
    if model.source == "causal_lm":
        return ModelShape(text, None, notes[0])
    vision, note = fallback.vision, f"vision: ndino-8b preset (model.vision={model.vision} not found)"
    if vision_folder is not None:
        vision = VisionShape.from_config(CLIPVisionConfig.from_pretrained(str(vision_folder)))
        note = f"vision: {vision_folder}/config.json"
    return ModelShape(text, vision, f"{note}; {notes[0]}")


def _config_folder(path: str | None) -> Path | None:
    """Return ``path`` when it is a folder holding an HF ``config.json``."""
    folder = Path(path).expanduser() if path else None
    return folder if folder is not None and (folder / "config.json").is_file() else None
