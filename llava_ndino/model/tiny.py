"""Tiny, deterministic, random-weight models in the real formats: an HF CLIP vision tower, a
LLaMA-3-style causal LM with its tokenizer, and an open_clip ViT.

They let tests, the CPU demo and cluster smoke tests run every code path without downloading
16 GB of weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

from llava_ndino.model.tokenizer import END_OF_TEXT, EOT, train_tiny_tokenizer

# OpenAI CLIP's pixel statistics, used by CLIP ViT-L/14-336 and therefore by LLaVA-NeXT.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class TinySizes:
    """Dimensions of the tiny models (defaults keep a forward pass in milliseconds)."""

    image_size: int = 336
    """Vision tile size in pixels (a multiple of patch_size)."""
    patch_size: int = 14
    """Vision patch size, as in CLIP ViT-L/14."""
    vision_hidden: int = 32
    """Vision tower width."""
    vision_layers: int = 2
    """Vision tower depth (at least 2, since features come from layer -2)."""
    llm_hidden: int = 64
    """Language-model width."""
    llm_layers: int = 2
    """Language-model depth."""
    vocab_size: int = 1024
    """BPE vocabulary size before the special tokens."""


def tiny_vision_config(sizes: TinySizes) -> CLIPVisionConfig:
    """Return a CLIP ViT config shaped like ViT-L/14-336 but tiny (QuickGELU, as OpenAI CLIP)."""
    return CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=max(1, sizes.vision_hidden // 16),
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
        hidden_act="quick_gelu",
    )


POSITION_INIT_STD = 1.0
"""Initial spread of the tiny tower's position embeddings. CLIP's 0.02 suits a pretrained tower;
trained from random, the position signal then starts about 50 times weaker than a 28 px patch's
content and the tower takes hundreds of steps to report where a patch is (``docs/benchmarks.md``,
"CPU demo", fourth round)."""


def tiny_vision_tower(sizes: TinySizes) -> CLIPVisionModel:
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


def tiny_llm(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes) -> LlamaForCausalLM:
    """Return the tiny random LLaMA-3-style causal LM of ``sizes`` for ``tokenizer``."""
    hidden = sizes.llm_hidden
    return llama3_lm(
        tokenizer, hidden, int(hidden * 2.75), sizes.llm_layers, max(2, hidden // 16), max(1, hidden // 32)
    )


def write_tiny(out_dir: Path, sizes: TinySizes | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``vision/``, ``llm/`` and ``openclip/`` tiny model folders under ``out_dir``.

    The same ``sizes`` and ``seed`` always give byte-identical weights.
    """
    sizes = sizes or TinySizes()
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in ("vision", "llm", "openclip")}

    torch.manual_seed(seed)
    vision = tiny_vision_tower(sizes)
    vision.save_pretrained(paths["vision"])
    tiny_image_processor(sizes.image_size).save_pretrained(paths["vision"])

    tokenizer = train_tiny_tokenizer(vocab_size=sizes.vocab_size)
    torch.manual_seed(seed + 1)
    llm = tiny_llm(tokenizer, sizes)
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    mark_tokenizer_portable(paths["llm"])

    from llava_ndino.model.openclip_tower import write_tiny_openclip  # open_clip is slow to import

    write_tiny_openclip(
        paths["openclip"], image_size=sizes.image_size, patch_size=sizes.patch_size, seed=seed + 2
    )
    return paths


def mark_tokenizer_portable(folder: Path) -> None:
    """Name ``PreTrainedTokenizerFast`` in ``tokenizer_config.json``, which transformers 4.x and 5.x both know.

    transformers 5 writes ``TokenizersBackend``, a class 4.x cannot import.
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
