"""Tiny random models: deterministic bytes, LLaMA-3 special tokens and chat template, portable tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from llava_ndino.formats.tokens import (
    BEGIN_OF_TEXT,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    LLAMA3_CHAT_TEMPLATE,
    START_HEADER,
)
from llava_ndino.model.tiny import FOLDER_SIZES, POSITION_INIT_STD, tiny_vision_tower, write_tiny

SPECIALS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT]
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
