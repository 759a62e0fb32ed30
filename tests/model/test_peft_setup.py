"""Tokenizer preparation for the text recipes (``model.peft_setup.prepare_tokenizer``): the pad token is
never eos, bos or id 0, and each template's stop token is a single token."""

from __future__ import annotations

import pytest

from llava_ndino.formats.prompts import get_template
from llava_ndino.model.peft_setup import prepare_tokenizer

TEMPLATES = ("llama2-it-chat", "alpaca-it", "llama3-anita", "llama3")


@pytest.fixture(scope="module")
def tokenizers(tiny_dirs) -> dict:
    """The tiny LLaMA-3-style tokenizer prepared for each template."""
    return {name: prepare_tokenizer(tiny_dirs["llm"], get_template(name)) for name in TEMPLATES}


@pytest.mark.parametrize("name", TEMPLATES)
def test_pad_is_never_eos_and_template_tokens_are_single_tokens(tokenizers, name: str) -> None:
    tokenizer = tokenizers[name]
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id not in {tokenizer.eos_token_id, tokenizer.bos_token_id, 0}
    stop = get_template(name).stop_token
    assert len(tokenizer(stop, add_special_tokens=False)["input_ids"]) == 1
    # the LLaMA-3 tokenizer's reserved token serves as pad: no new embedding row is needed
    if name in ("llama3", "llama3-anita"):
        assert tokenizer.pad_token == "<|reserved_special_token_0|>"
