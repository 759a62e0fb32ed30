"""Prompt templates (``formats.prompts``) against the references: Meta's LLaMA-3 chat template (in the
tiny tokenizer) and the processor's multimodal Jinja template, as plain transformers renders them; the
Italian text templates against their own Jinja chat templates, with their system prompts and markers."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.formats.prompts import (
    ANITA_SYSTEM_PROMPT,
    LLAMA3_MULTIMODAL_TEMPLATE,
    LLAMANTINO2_SYSTEM_PROMPT,
    Message,
    content_to_text,
    get_template,
    llava_chat_template,
)
from llava_ndino.model.peft_setup import prepare_tokenizer
from tests.helpers import LEGAL_CHAT, TEXT_TEMPLATES

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
    with pytest.raises(
        KeyError, match="alpaca-it, llama2-it-chat, llama3, llama3-anita, llama3-anita-script, plain"
    ):
        get_template("chatml")


# --- the Italian text templates against their own Jinja chat templates ----------------------------

TEXT_CONVERSATIONS = [
    [{"role": "user", "content": "Ciao, come stai?"}, {"role": "assistant", "content": " Bene, grazie! "}],
    LEGAL_CHAT,
    [
        {"role": "user", "content": "Traduci in inglese."},
        {"role": "user", "content": "Buongiorno"},
        {"role": "assistant", "content": "Good morning"},
    ],
]


ALL_TEXT_TEMPLATES = (*TEXT_TEMPLATES, "llama3-anita-script")


@pytest.fixture(scope="module")
def script_tokenizer(tiny_dirs):
    """The tiny LLaMA-3-style tokenizer prepared for llama3-anita-script."""
    return prepare_tokenizer(tiny_dirs["llm"], get_template("llama3-anita-script"))


def _prepared(text_tokenizers, script_tokenizer, name: str):
    return script_tokenizer if name == "llama3-anita-script" else text_tokenizers[name]


@pytest.mark.parametrize("name", ALL_TEXT_TEMPLATES)
@pytest.mark.parametrize("conversation", range(len(TEXT_CONVERSATIONS)))
def test_template_matches_its_chat_template(
    text_tokenizers, script_tokenizer, name: str, conversation: int
) -> None:
    messages = TEXT_CONVERSATIONS[conversation]
    tokenizer = _prepared(text_tokenizers, script_tokenizer, name)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render(name, messages)
    template = get_template(name)
    prompt = [Message(m["role"], m["content"]) for m in messages[:-1]]
    expected = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert template.generation_prompt(prompt) == expected


# --- the text templates against the strings their public sources publish --------------------------
# Each expectation is written out from the source named next to it, not from this project's constants.

# swap-uniba/LLaMAntino-2-chat-13b-hf-UltraChat-ITA and -chat-7b-hf-UltraChat-ITA model cards, "Prompt
# Format" (the same text as marcopoli/LLaMAntino-2-ITA README.md, "Chat Version"): the system prompt ...
CARD_LLAMA2_SYSTEM = (
    "Sei un assistente disponibile, rispettoso e onesto. "
    "Rispondi sempre nel modo piu' utile possibile, pur essendo sicuro. "
    "Le risposte non devono includere contenuti dannosi, non etici, razzisti, sessisti, tossici, pericolosi o illegali. "
    "Assicurati che le tue risposte siano socialmente imparziali e positive. "
    "Se una domanda non ha senso o non e' coerente con i fatti, spiegane il motivo invece di rispondere in modo non corretto. "
    "Se non conosci la risposta a una domanda, non condividere informazioni false."
)
# ... and the conversation: " [INST]<<SYS>>\n" + system + "\n<</SYS>>\n\n" +
# f"{user_msg_1}[/INST] {model_answer_1} </s> <s> [INST]{user_msg_2}[/INST] {model_answer_2} </s> ..."
# The card's string starts at " [INST]": its note 2 says the tokenizer adds the BOS, else prepend "<s>";
# the text pipeline tokenizes without special tokens, so the template writes that "<s>".
CARD_LLAMA2_CHAT = (
    "<s> [INST]<<SYS>>\n{system}\n<</SYS>>\n\n{u1}[/INST] {a1} </s> <s> [INST]{u2}[/INST] {a2} </s>"
)

# swap-uniba/LLaMAntino-2-7b-hf-dolly-ITA model card (and marcopoli/LLaMAntino-2-ITA README.md,
# "Fine-Tuned Version"): the format used for fine-tuning, with an input ...
CARD_ALPACA_WITH_INPUT = (
    "Di seguito è riportata un'istruzione che descrive un'attività, abbinata ad un input che fornisce ulteriore informazione. "
    "Scrivi una risposta che soddisfi adeguatamente la richiesta.\n\n"
    "### Istruzione:\n{instruction}\n\n### Input:\n{input}\n\n### Risposta:\n{response}"
)
# ... and "If no input was present in the instruction":
CARD_ALPACA_NO_INPUT = (
    "Di seguito è riportata un'istruzione che descrive un'attività. "
    "Scrivi una risposta che soddisfi adeguatamente la richiesta.\n\n"
    "### Istruzione:\n{instruction}\n\n### Risposta:\n{response}"
)

# marcopoli/LLaMAntino-3-ANITA model_adaptation/finetune_llama3.py, formatting_prompts_func: Meta's
# LLaMA-3 chat template (no generation prompt) + "<|end_of_text|>", then every "<|eot_id|>" replaced by
# " <|eot_id|> " and "<|begin_of_text|>" by "<|begin_of_text|> ". For a one-turn UltraChat row:
SCRIPT_ANITA_ONE_TURN = (
    "<|begin_of_text|> <|start_header_id|>user<|end_header_id|>\n\n{u} <|eot_id|> "
    "<|start_header_id|>assistant<|end_header_id|>\n\n{a} <|eot_id|> <|end_of_text|>"
)


def test_llama2_it_chat_is_the_model_cards_string() -> None:
    chat = [
        {"role": "user", "content": "Ciao, come stai?"},
        {"role": "assistant", "content": "Bene, grazie!"},
        {"role": "user", "content": "Che ore sono?"},
        {"role": "assistant", "content": "Non lo so."},
    ]
    expected = CARD_LLAMA2_CHAT.format(
        system=CARD_LLAMA2_SYSTEM,
        u1="Ciao, come stai?",
        a1="Bene, grazie!",
        u2="Che ore sono?",
        a2="Non lo so.",
    )
    assert render("llama2-it-chat", chat) == expected
    # the card's inference prompt: the first turn up to "[/INST]"
    prompt = get_template("llama2-it-chat").generation_prompt([Message("user", "Ciao, come stai?")])
    assert prompt == f"<s> [INST]<<SYS>>\n{CARD_LLAMA2_SYSTEM}\n<</SYS>>\n\nCiao, come stai?[/INST]"
    assert LLAMANTINO2_SYSTEM_PROMPT == CARD_LLAMA2_SYSTEM


def test_llama2_it_chat_jinja_is_the_model_cards_string(text_tokenizers) -> None:
    one = TEXT_CONVERSATIONS[0]
    expected = (
        f"<s> [INST]<<SYS>>\n{CARD_LLAMA2_SYSTEM}\n<</SYS>>\n\nCiao, come stai?[/INST] Bene, grazie! </s>"
    )
    assert text_tokenizers["llama2-it-chat"].apply_chat_template(one, tokenize=False) == expected


@pytest.mark.parametrize("how", ["render", "jinja"])
def test_alpaca_it_uses_the_cards_preamble_with_and_without_input(text_tokenizers, how: str) -> None:
    def text(messages: list[dict]) -> str:
        if how == "render":
            return render("alpaca-it", messages)
        return text_tokenizers["alpaca-it"].apply_chat_template(messages, tokenize=False)

    with_input = TEXT_CONVERSATIONS[2]
    assert (
        text(with_input)
        == "<s>"
        + CARD_ALPACA_WITH_INPUT.format(
            instruction="Traduci in inglese.", input="Buongiorno", response="Good morning"
        )
        + "</s>"
    )
    no_input = [
        {"role": "user", "content": "Traduci in inglese: ciao."},
        {"role": "assistant", "content": "Hi."},
    ]
    assert (
        text(no_input)
        == "<s>"
        + CARD_ALPACA_NO_INPUT.format(instruction="Traduci in inglese: ciao.", response="Hi.")
        + "</s>"
    )


def test_alpaca_it_generation_prompt_follows_the_input(text_tokenizers) -> None:
    template = get_template("alpaca-it")
    no_input = template.generation_prompt([Message("user", "Scrivi una poesia.")])
    assert no_input == "<s>" + CARD_ALPACA_NO_INPUT.format(instruction="Scrivi una poesia.", response="")
    with_input = template.generation_prompt([Message("user", "Riassumi."), Message("user", "Testo")])
    assert with_input == "<s>" + CARD_ALPACA_WITH_INPUT.format(
        instruction="Riassumi.", input="Testo", response=""
    )


def test_anita_script_template_is_the_scripts_string() -> None:
    one = [{"role": "user", "content": "Chi è Carlo Magno?"}, {"role": "assistant", "content": "Un re."}]
    assert render("llama3-anita-script", one) == SCRIPT_ANITA_ONE_TURN.format(
        u="Chi è Carlo Magno?", a="Un re."
    )
    two = render("llama3-anita-script", LEGAL_CHAT)
    assert two == (
        "<|begin_of_text|> <|start_header_id|>system<|end_header_id|>\n\nSei un esperto di diritto. <|eot_id|> "
        "<|start_header_id|>user<|end_header_id|>\n\nChe cos'è un decreto? <|eot_id|> "
        "<|start_header_id|>assistant<|end_header_id|>\n\nUn atto del governo. <|eot_id|> "
        "<|start_header_id|>user<|end_header_id|>\n\nE una legge? <|eot_id|> "
        "<|start_header_id|>assistant<|end_header_id|>\n\nUn atto del parlamento. <|eot_id|> <|end_of_text|>"
    )


def test_anita_script_equals_meta_template_rewritten_as_the_script_does(tokenizer) -> None:
    """finetune_llama3.py's formatting_prompts_func, redone here on the tiny tokenizer's Meta template."""
    for messages in [*CONVERSATIONS.values(), *TEXT_CONVERSATIONS]:
        meta = tokenizer.apply_chat_template(messages, tokenize=False) + "<|end_of_text|>"
        script = meta.replace("<|eot_id|>", " <|eot_id|> ").replace("<|begin_of_text|>", "<|begin_of_text|> ")
        assert render("llama3-anita-script", messages) == script


def test_templates_use_their_italian_prompts_and_markers() -> None:
    one = TEXT_CONVERSATIONS[0]
    # the LLaMAntino-2 chat cards' spacing (see CARD_LLAMA2_CHAT), not Meta's "<s>[INST] <<SYS>> ... [/INST]"
    llama2 = render("llama2-it-chat", one)
    assert (
        llama2
        == f"<s> [INST]<<SYS>>\n{CARD_LLAMA2_SYSTEM}\n<</SYS>>\n\nCiao, come stai?[/INST] Bene, grazie! </s>"
    )
    alpaca = render("alpaca-it", TEXT_CONVERSATIONS[2])
    assert (
        alpaca
        == "<s>"
        + CARD_ALPACA_WITH_INPUT.format(
            instruction="Traduci in inglese.", input="Buongiorno", response="Good morning"
        )
        + "</s>"
    )
    # LLaMAntino-3-ANITA-8B-Inst-DPO-ITA model card / marcopoli/LLaMAntino-3-ANITA README.md: the system prompt
    card_anita_system = (
        "Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA "
        "(Advanced Natural-based interaction for the ITAlian language). "
        "Rispondi nella lingua usata per la domanda in modo chiaro, semplice ed esaustivo."
    )
    assert card_anita_system == ANITA_SYSTEM_PROMPT
    anita = render("llama3-anita", one)
    assert anita.startswith(
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{card_anita_system}"
    )
    assert render("llama3-anita", TEXT_CONVERSATIONS[1]).count("Sei un esperto di diritto.") == 1
    assert ANITA_SYSTEM_PROMPT not in render("llama3-anita", TEXT_CONVERSATIONS[1])
    # the script variant adds no system prompt (finetune_llama3.py renders the rows' messages only)
    assert "<|start_header_id|>system" not in render("llama3-anita-script", one)
