"""Tiny random models (``model.tiny``): deterministic bytes, LLaMA-3 special tokens and chat template,
portable tokenizer, and a tiny VLM whose patch size reaches the tower, the processor and the forward."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from llava_ndino.config import load_config
from llava_ndino.formats.tokens import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    START_HEADER,
)
from llava_ndino.model.loading import build_model
from llava_ndino.model.tiny import FOLDER_SIZES, POSITION_INIT_STD, tiny_vision_tower, write_tiny

SPECIALS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT]
TINY_VLM = ["recipe=demo", "output_dir=unused", "model.tiny.hidden_size=64", "data.synthetic.image_size=112"]
WEIGHT_FILES = ["vision/model.safetensors", "llm/model.safetensors", "openclip/open_clip_model.safetensors"]


@pytest.fixture(scope="module")
def second_copy(tmp_path_factory):
    """A second ``write_tiny`` with the fixture's sizes and seed."""
    return write_tiny(tmp_path_factory.mktemp("tiny_again"), FOLDER_SIZES, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_dirs["llm"])


def test_same_seed_gives_byte_identical_files(tiny_dirs, second_copy):
    root_a, root_b = tiny_dirs["vision"].parent, second_copy["vision"].parent
    for name in [*WEIGHT_FILES, "llm/tokenizer.json"]:
        a, b = (root_a / name).read_bytes(), (root_b / name).read_bytes()
        assert len(a) > 1000, name
        assert a == b, name


def test_other_seed_gives_other_weights(tiny_dirs, tmp_path):
    other = write_tiny(tmp_path, FOLDER_SIZES, seed=5)
    root = tiny_dirs["vision"].parent
    for name in WEIGHT_FILES:
        assert (root / name).read_bytes() != (other["vision"].parent / name).read_bytes(), name


def test_tokenizer_has_llama3_specials(tokenizer):
    bpe_size = FOLDER_SIZES.vocab_size
    for token in SPECIALS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_id >= bpe_size  # after the BPE ids, as LLaMA-3's start at 128000
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert tokenizer.added_tokens_decoder[token_id].special
        assert tokenizer.decode([token_id], skip_special_tokens=True) == ""
    assert tokenizer.bos_token == BEGIN_OF_TEXT
    assert tokenizer.eos_token == EOT


def test_tokenizer_chat_template_is_metas(tokenizer, tiny_dirs):
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Ciao"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"{BEGIN_OF_TEXT}{START_HEADER}user{END_HEADER}\n\nCiao{EOT}{START_HEADER}assistant{END_HEADER}\n\n"
    )


def test_tokenizer_config_is_portable(tiny_dirs):
    config = json.loads((tiny_dirs["llm"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert isinstance(PreTrainedTokenizerFast.from_pretrained(tiny_dirs["llm"]), PreTrainedTokenizerFast)


def test_llm_and_vision_configs(tiny_dirs, tokenizer):
    stops = {tokenizer.convert_tokens_to_ids(END_OF_TEXT), tokenizer.convert_tokens_to_ids(EOT)}
    llm = AutoConfig.from_pretrained(tiny_dirs["llm"])
    assert llm.vocab_size == len(tokenizer)
    assert set(llm.eos_token_id) == stops
    assert set(GenerationConfig.from_pretrained(tiny_dirs["llm"]).eos_token_id) == stops
    assert llm.tie_word_embeddings is False
    vision = AutoConfig.from_pretrained(tiny_dirs["vision"])
    assert (vision.image_size, vision.patch_size, vision.hidden_act) == (336, 14, "quick_gelu")
    assert vision.num_hidden_layers >= 2  # features come from layer -2


def test_tiny_tower_position_embeddings_start_as_strong_as_patch_content():
    torch.manual_seed(0)
    tower = tiny_vision_tower(replace(FOLDER_SIZES, tile_size=112, patch_size=28, vision_hidden_size=64))
    embeddings = tower.embeddings
    position_std = embeddings.position_embedding.weight.std().item()
    assert abs(position_std - POSITION_INIT_STD) < 0.1
    # A white patch's content after the patch projection: same order as the position signal.
    white = torch.ones(1, 3, 28, 28)
    content_std = embeddings.patch_embedding(white).std().item()
    assert 0.2 < position_std / content_std < 5, (position_std, content_std)


@pytest.mark.parametrize("patch", [14, 28])
def test_tiny_patch_size_reaches_tower_processor_and_forward(patch: int) -> None:
    cfg = load_config([*TINY_VLM, f"model.tiny.patch_size={patch}"])
    model, processor = build_model(cfg.model, seed=0)
    side = 112 // patch
    assert model.config.vision_config.patch_size == processor.patch_size == patch
    assert model.config.image_seq_length == side * side
    image = Image.new("RGB", (112, 112), (200, 30, 30))
    batch = processor(images=[image], text=["<image> Di che colore è il cerchio?"], return_tensors="pt")
    image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    # A square tile-sized image: the base tile, then the two half-padded grid tiles unpadded back to
    # the image's side x side patches, and a newline per grid row.
    assert image_tokens == 2 * side * side + side
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
