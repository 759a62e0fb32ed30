"""Prompt templates (``formats.prompts``) against the references: Meta's LLaMA-3 chat template (in the
tiny tokenizer) and the processor's multimodal Jinja template, as plain transformers renders them; the
Italian text templates against their own Jinja chat templates, with their system prompts and markers."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.formats.prompts import (
    ALPACA_IT_PREAMBLE,
    ANITA_SYSTEM_PROMPT,
    LLAMA3_MULTIMODAL_TEMPLATE,
    LLAMANTINO2_SYSTEM_PROMPT,
    Message,
    content_to_text,
    get_template,
    llava_chat_template,
)
from llava_ndino.model.peft_setup import prepare_tokenizer

CONVERSATIONS = {
    "one-turn": [
        {"role": "user", "content": "Ciao, come stai?"},
        {"role": "assistant", "content": "Bene, grazie!"},
    ],
    "system-and-whitespace": [
        {"role": "system", "content": "  Sei un assistente italiano.\n\n"},
        {"role": "user", "content": "\n Qual è la capitale d'Italia?  "},
        {"role": "assistant", "content": " Roma. \n"},
    ],
    "multi-turn-unicode": [
        {"role": "user", "content": "Scrivi una lista:\n- uno\n- due"},
        {"role": "assistant", "content": "1. uno\n2. due\n\nFatto — è tutto."},
        {"role": "user", "content": "Perché?\t"},
        {"role": "assistant", "content": "Perché sì: 123 456, €5 e «virgolette»."},
    ],
    "empty-answer-text": [
        {"role": "user", "content": "   "},
        {"role": "assistant", "content": "Va bene."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    """The tiny LLaMA-3 tokenizer with Meta's chat template."""
    return AutoTokenizer.from_pretrained(tiny_dirs["llm"])


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


def render(name: str, messages: list[dict]) -> str:
    template = get_template(name)
    return "".join(
        s.text for s in template.render([Message(m["role"], content_to_text(m["content"])) for m in messages])
    )


def to_llava(messages: list[dict]) -> dict:
    roles = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"id": "t", "conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in messages]}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_llama3_render_equals_meta_template(tokenizer, name):
    messages = CONVERSATIONS[name]
    assert render("llama3", messages) == tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encoder_ids_equal_meta_template_ids(tokenizer, processor, name):
    messages = CONVERSATIONS[name]
    expected = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    encoded = ConversationEncoder(processor, "llama3").encode(to_llava(messages))
    assert encoded.input_ids.tolist() == list(expected)
    # ... which is the whole rendered string tokenized at once
    whole = processor.tokenizer(render("llama3", messages), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids.tolist() == whole


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_generation_prompt(tokenizer, processor, name):
    history = CONVERSATIONS[name][:-1]
    ours = get_template("llama3").generation_prompt([Message(m["role"], m["content"]) for m in history])
    assert ours == tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert ours == processor.apply_chat_template(history, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_processor_template_on_string_content(processor, name):
    messages = CONVERSATIONS[name]
    assert processor.chat_template == LLAMA3_MULTIMODAL_TEMPLATE == llava_chat_template()
    assert processor.apply_chat_template(messages) == render("llama3", messages)


MULTIMODAL = [
    {"role": "system", "content": [{"type": "text", "text": "Rispondi brevemente. "}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Cosa vedi?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": " Un cane. "}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "E in queste due?\n"},
            {"type": "image"},
            {"type": "text", "text": "prima, "},
            {"type": "image"},
            {"type": "text", "text": "seconda"},
        ],
    },
    {"role": "assistant", "content": "Due gatti."},
]


def test_processor_template_on_list_content(processor):
    ours = render("llama3", MULTIMODAL)
    assert ours.count("<image>\n") == 3
    assert "<image>\nCosa vedi?" in ours
    assert processor.apply_chat_template(MULTIMODAL) == ours
    assert processor.apply_chat_template(MULTIMODAL[:-1], add_generation_prompt=True) == get_template(
        "llama3"
    ).generation_prompt([Message(m["role"], content_to_text(m["content"])) for m in MULTIMODAL[:-1]])


def test_plain_jinja_equals_plain_render(tokenizer):
    plain = get_template("plain")
    for messages in [*CONVERSATIONS.values(), MULTIMODAL]:
        jinja = tokenizer.apply_chat_template(messages, chat_template=plain.chat_template, tokenize=False)
        assert jinja == render("plain", messages)


def test_encoder_tokenization_equals_whole_string_with_images(processor):
    """Image samples: the encoder's ids are the processor's ids for the whole rendered string."""
    images = [Image.new("RGB", (20, 30), (1, 2, 3)), Image.new("RGB", (50, 20), (200, 100, 0))]
    sample = {"id": "mm", "images": ["a.png", "b.png", "c.png"], "messages": MULTIMODAL}
    encoded = ConversationEncoder(processor, "llama3").encode(
        sample, images=[images[0], images[1], images[0]]
    )
    whole = processor(
        images=[images[0], images[1], images[0]],
        text=[render("llama3", MULTIMODAL)],
        add_special_tokens=False,
        return_tensors="pt",
    )
    assert encoded.input_ids.tolist() == whole["input_ids"][0].tolist()


def test_unknown_template_lists_known():
    with pytest.raises(KeyError, match="alpaca-it, llama2-it-chat, llama3, llama3-anita, plain"):
        get_template("chatml")


# --- the Italian text templates against their own Jinja chat templates ----------------------------

TEXT_TEMPLATES = ("llama2-it-chat", "alpaca-it", "llama3-anita")
TEXT_CONVERSATIONS = [
    [{"role": "user", "content": "Ciao, come stai?"}, {"role": "assistant", "content": " Bene, grazie! "}],
    [
        {"role": "system", "content": "Sei un esperto di diritto."},
        {"role": "user", "content": "Che cos'è un decreto?"},
        {"role": "assistant", "content": "Un atto del governo."},
        {"role": "user", "content": "E una legge?"},
        {"role": "assistant", "content": "Un atto del parlamento."},
    ],
    [
        {"role": "user", "content": "Traduci in inglese."},
        {"role": "user", "content": "Buongiorno"},
        {"role": "assistant", "content": "Good morning"},
    ],
]


@pytest.fixture(scope="module")
def text_tokenizers(tiny_dirs) -> dict:
    """The tiny LLaMA-3-style tokenizer prepared for each text template (its tokens and Jinja template)."""
    return {name: prepare_tokenizer(tiny_dirs["llm"], get_template(name)) for name in TEXT_TEMPLATES}


@pytest.mark.parametrize("name", TEXT_TEMPLATES)
@pytest.mark.parametrize("conversation", range(len(TEXT_CONVERSATIONS)))
def test_template_matches_its_chat_template(text_tokenizers, name: str, conversation: int) -> None:
    messages = TEXT_CONVERSATIONS[conversation]
    tokenizer = text_tokenizers[name]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render(name, messages)
    template = get_template(name)
    prompt = [Message(m["role"], m["content"]) for m in messages[:-1]]
    expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert template.generation_prompt(prompt) == expected


def test_templates_use_their_italian_prompts_and_markers() -> None:
    one = TEXT_CONVERSATIONS[0]
    llama2 = render("llama2-it-chat", one)
    assert (
        llama2
        == f"<s>[INST] <<SYS>>\n{LLAMANTINO2_SYSTEM_PROMPT}\n<</SYS>>\n\nCiao, come stai? [/INST] Bene, grazie! </s>"
    )
    alpaca = render("alpaca-it", TEXT_CONVERSATIONS[2])
    assert alpaca == (
        f"<s>{ALPACA_IT_PREAMBLE}\n\n### Istruzione:\nTraduci in inglese.\n\n### Input:\nBuongiorno"
        "\n\n### Risposta:\nGood morning</s>"
    )
    anita = render("llama3-anita", one)
    assert anita.startswith(
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{ANITA_SYSTEM_PROMPT}"
    )
    assert render("llama3-anita", TEXT_CONVERSATIONS[1]).count("Sei un esperto di diritto.") == 1
    assert ANITA_SYSTEM_PROMPT not in render("llama3-anita", TEXT_CONVERSATIONS[1])
