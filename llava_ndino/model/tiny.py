"""Tiny, deterministic, random-weight models in the real formats: an HF CLIP vision tower, a
LLaMA-3-style causal LM with its tokenizer, and an open_clip ViT.

They let tests, the CPU demo and cluster smoke tests run every code path without downloading
16 GB of weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from llava_ndino.config import TinyConfig
from llava_ndino.formats.tokens import END_OF_TEXT, EOT
from llava_ndino.model.build import CLIP_MEAN, CLIP_STD
from llava_ndino.model.hf_files import mark_tokenizer_portable
from llava_ndino.model.tokenizer import train_tiny_tokenizer

FOLDER_SIZES = TinyConfig(tile_size=336, hidden_size=64, vision_hidden_size=32)
"""Sizes of the folders ``ndino tiny`` and the tests write: CLIP ViT-L/14-336's tile, narrow widths, so
a forward pass takes milliseconds."""


def tiny_vision_config(sizes: TinyConfig) -> CLIPVisionConfig:
    """Return a CLIP ViT config shaped like ViT-L/14-336 but tiny (QuickGELU, as OpenAI CLIP)."""
    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size,
        intermediate_size=4 * sizes.vision_hidden_size,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=max(1, sizes.vision_hidden_size // 16),
        image_size=sizes.tile_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden_size,
        hidden_act="quick_gelu",
    )


POSITION_INIT_STD = 1.0
"""Initial spread of the tiny tower's position embeddings. CLIP's 0.02 suits a pretrained tower;
trained from random, the position signal then starts far weaker than a patch's content and the
tower takes hundreds of steps to report where a patch is."""


def tiny_vision_tower(sizes: TinyConfig) -> CLIPVisionModel:
    """Return a random tiny CLIP tower of ``sizes`` whose position embeddings start at
    :data:`POSITION_INIT_STD`, so that where a patch lies is visible from the first step."""
    tower = CLIPVisionModel(tiny_vision_config(sizes))
    embeddings = getattr(tower, "vision_model", tower).embeddings
    nn.init.normal_(embeddings.position_embedding.weight, std=POSITION_INIT_STD)
    return tower


def tiny_image_processor(image_size: int) -> CLIPImageProcessor:
    """Return the CLIP image processor that goes with a vision tower of ``image_size`` pixels."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def llama3_lm(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int | None = None,
) -> LlamaForCausalLM:
    """Return a random LLaMA-3-style causal LM (GQA, untied head, rope theta 500k) that stops on the
    tokenizer's end-of-text and end-of-turn tokens; ``vocab`` rows default to the tokenizer's size."""
    stop_ids = [tokenizer.convert_tokens_to_ids(END_OF_TEXT), tokenizer.convert_tokens_to_ids(EOT)]
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids)
    return model


def tiny_llm(tokenizer: PreTrainedTokenizerFast, sizes: TinyConfig) -> LlamaForCausalLM:
    """Return the tiny random LLaMA-3-style causal LM of ``sizes`` for ``tokenizer``."""
    hidden = sizes.hidden_size
    return llama3_lm(
        tokenizer, hidden, int(hidden * 2.75), sizes.layers, max(2, hidden // 16), max(1, hidden // 32)
    )


def write_tiny(out_dir: Path, sizes: TinyConfig | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``vision/``, ``llm/`` and ``openclip/`` tiny model folders under ``out_dir``.

    The same ``sizes`` and ``seed`` always give byte-identical weights.
    """
    sizes = sizes or FOLDER_SIZES
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("vision", "llm", "openclip")}

    torch.manual_seed(seed)
    vision = tiny_vision_tower(sizes)
    vision.save_pretrained(paths["vision"])
    tiny_image_processor(sizes.tile_size).save_pretrained(paths["vision"])

    tokenizer = train_tiny_tokenizer(vocab_size=sizes.vocab_size)
    torch.manual_seed(seed + 1)
    llm = tiny_llm(tokenizer, sizes)
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    mark_tokenizer_portable(paths["llm"])

    from llava_ndino.model.openclip_tower import write_tiny_openclip  # open_clip is slow to import

    write_tiny_openclip(
        paths["openclip"], image_size=sizes.tile_size, patch_size=sizes.patch_size, seed=seed + 2
    )
    return paths
