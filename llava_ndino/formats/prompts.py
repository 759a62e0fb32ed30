"""Conversation templates: the one source of truth for prompt text and for which tokens carry loss.

A template renders a list of messages into segments; each segment says whether its tokens are
trained. The training pipeline masks labels from these segments, and the Jinja chat template that
ships inside exported processors renders the same text (tests check both against each other, against
Meta's LLaMA-3 template and against the strings the LLaMAntino model cards and ANITA's scripts publish).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llava_ndino.formats.tokens import BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, START_HEADER

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One conversation turn; ``content`` may hold ``<image>`` placeholders."""

    role: str
    content: str


@dataclass(frozen=True)
class Segment:
    """A run of prompt text; ``train`` marks text whose tokens get labels."""

    text: str
    train: bool


@dataclass(frozen=True)
class Template:
    """A named template: how to render a conversation, and how to prompt for the next answer."""

    name: str
    description: str
    render: Callable[[list[Message]], list[Segment]]
    generation_prompt: Callable[[list[Message]], str]
    chat_template: str
    stop_token: str
    added_tokens: tuple[str, ...] = ()
    """Special tokens the rendered text uses; text tasks add the ones a tokenizer lacks."""


def content_to_text(content: str | list[dict]) -> str:
    """Flatten transformers' multimodal content (``[{"type": "image"}, {"type": "text", ...}]``).

    Each image becomes ``<image>`` followed by a newline, as in LLaVA data (``"<image>\\nDomanda"``).
    """
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER + "\n")
        elif kind == "text":
            parts.append(item.get("text", ""))
        else:
            raise ValueError(f"unsupported content item type {kind!r}: use 'image' or 'text'")
    return "".join(parts)


def _llama3_render(messages: list[Message]) -> list[Segment]:
    segments = [Segment(BEGIN_OF_TEXT, False)]
    for message in messages:
        header = f"{START_HEADER}{message.role}{END_HEADER}\n\n"
        body = message.content.strip()
        if message.role == "assistant":
            segments += [Segment(header, False), Segment(body + EOT, True)]
        else:
            segments.append(Segment(header + body + EOT, False))
    return segments


def _llama3_generation_prompt(messages: list[Message]) -> str:
    return "".join(s.text for s in _llama3_render(messages)) + f"{START_HEADER}assistant{END_HEADER}\n\n"


def _plain_render(messages: list[Message]) -> list[Segment]:
    segments = [Segment(BEGIN_OF_TEXT, False)]
    for message in messages:
        if message.role == "assistant":
            segments.append(Segment(message.content.strip() + END_OF_TEXT, True))
        elif message.role == "user":
            segments.append(Segment(message.content.strip() + "\n", False))
    return segments


def _plain_generation_prompt(messages: list[Message]) -> str:
    return "".join(s.text for s in _plain_render(messages))


# LLaMA-2's sentence markers; LLaMA-2 tokenizers have them, text tasks add them to others.
LLAMA2_BOS, LLAMA2_EOS = "<s>", "</s>"
# LLaMAntino-2 chat models: the Italian rendering of LLaMA-2's default system prompt (model cards of
# swap-uniba/LLaMAntino-2-chat-*-UltraChat-ITA).
LLAMANTINO2_SYSTEM_PROMPT = (
    "Sei un assistente disponibile, rispettoso e onesto. Rispondi sempre nel modo piu' utile possibile, "
    "pur essendo sicuro. Le risposte non devono includere contenuti dannosi, non etici, razzisti, sessisti, "
    "tossici, pericolosi o illegali. Assicurati che le tue risposte siano socialmente imparziali e positive. "
    "Se una domanda non ha senso o non e' coerente con i fatti, spiegane il motivo invece di rispondere in "
    "modo non corretto. Se non conosci la risposta a una domanda, non condividere informazioni false."
)
# LLaMAntino-2 instruction models (dolly-ITA, EVALITA): the Italian Alpaca preambles of their model
# cards' "Fine-Tuned Version" prompt format, one for rows with an input, one for rows without.
ALPACA_IT_PREAMBLE = (
    "Di seguito è riportata un'istruzione che descrive un'attività, abbinata ad un input che fornisce "
    "ulteriore informazione. Scrivi una risposta che soddisfi adeguatamente la richiesta."
)
ALPACA_IT_NO_INPUT_PREAMBLE = (
    "Di seguito è riportata un'istruzione che descrive un'attività. "
    "Scrivi una risposta che soddisfi adeguatamente la richiesta."
)
# LLaMAntino-3-ANITA's system prompt, as its model card writes it (including "un an").
ANITA_SYSTEM_PROMPT = (
    "Sei un an assistente AI per la lingua Italiana di nome LLaMAntino-3 ANITA "
    "(Advanced Natural-based interaction for the ITAlian language). "
    "Rispondi nella lingua usata per la domanda in modo chiaro, semplice ed esaustivo."
)


def _split_system(messages: list[Message], default: str) -> tuple[str, list[Message]]:
    """The sample's system prompt (or ``default``) and the remaining messages."""
    if messages and messages[0].role == "system":
        return messages[0].content.strip(), messages[1:]
    return default, messages


def _llama2_render(messages: list[Message]) -> list[Segment]:
    """The LLaMAntino-2 chat cards' string: ``<s>`` (the BOS their tokenizer adds) then
    ``" [INST]<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}[/INST] {answer} </s> <s> [INST]{user}[/INST]"``:
    no space after ``[INST]`` nor before ``[/INST]``, one between ``</s>`` and ``<s>``."""
    system, rest = _split_system(messages, LLAMANTINO2_SYSTEM_PROMPT)
    segments, first = [], True
    for message in rest:
        body = message.content.strip()
        if message.role == "user":
            opening = (
                f"{LLAMA2_BOS} [INST]<<SYS>>\n{system}\n<</SYS>>\n\n" if first else f" {LLAMA2_BOS} [INST]"
            )
            segments.append(Segment(f"{opening}{body}[/INST]", False))
            first = False
        elif message.role == "assistant":
            segments.append(Segment(f" {body} {LLAMA2_EOS}", True))
    return segments


def _llama2_generation_prompt(messages: list[Message]) -> str:
    return "".join(s.text for s in _llama2_render(messages))


def has_input(messages: list[Message]) -> bool:
    """Whether an instruction conversation has an input: a user turn right after a user turn (how
    :func:`~llava_ndino.data.text.text_conversation` maps a row's non-empty ``input``)."""
    return any(a.role == b.role == "user" for a, b in zip(messages, messages[1:], strict=False))


def _alpaca_render(messages: list[Message]) -> list[Segment]:
    default = ALPACA_IT_PREAMBLE if has_input(messages) else ALPACA_IT_NO_INPUT_PREAMBLE
    preamble, rest = _split_system(messages, default)
    segments, previous = [Segment(LLAMA2_BOS + preamble, False)], ""
    for message in rest:
        body = message.content.strip()
        if message.role == "user":
            heading = "Input" if previous == "user" else "Istruzione"
            segments.append(Segment(f"\n\n### {heading}:\n{body}", False))
        elif message.role == "assistant":
            segments += [Segment("\n\n### Risposta:\n", False), Segment(body + LLAMA2_EOS, True)]
        previous = message.role
    return segments


def _alpaca_generation_prompt(messages: list[Message]) -> str:
    return "".join(s.text for s in _alpaca_render(messages)) + "\n\n### Risposta:\n"


def _with_system(render: Callable[[list[Message]], list[Segment]], default: str):
    """``render`` with ``default`` as the system message when the sample has none."""

    def rendered(messages: list[Message]) -> list[Segment]:
        if messages and messages[0].role == "system":
            return render(messages)
        return render([Message("system", default), *messages])

    return rendered


def _anita_generation_prompt(messages: list[Message]) -> str:
    segments = _with_system(_llama3_render, ANITA_SYSTEM_PROMPT)(messages)
    return "".join(s.text for s in segments) + f"{START_HEADER}assistant{END_HEADER}\n\n"


def _anita_script_turns(messages: list[Message]) -> list[Segment]:
    """The turns as ANITA's SFT script renders them: Meta's LLaMA-3 template with every
    ``<|eot_id|>`` widened to ``" <|eot_id|> "`` and a space after ``<|begin_of_text|>``."""
    segments = [Segment(BEGIN_OF_TEXT + " ", False)]
    for message in messages:
        header = f"{START_HEADER}{message.role}{END_HEADER}\n\n"
        body = message.content.strip()
        if message.role == "assistant":
            segments += [Segment(header, False), Segment(f"{body} {EOT}", True), Segment(" ", False)]
        else:
            segments.append(Segment(f"{header}{body} {EOT} ", False))
    return segments


def _anita_script_render(messages: list[Message]) -> list[Segment]:
    return [*_anita_script_turns(messages), Segment(END_OF_TEXT, False)]


def _anita_script_generation_prompt(messages: list[Message]) -> str:
    return "".join(s.text for s in _anita_script_turns(messages)) + f"{START_HEADER}assistant{END_HEADER}\n\n"


# Meta's LLaMA-3 template, extended to transformers' list-of-items content (images render as
# "<image>\n", texts as themselves) so that processor.apply_chat_template accepts both forms.
_FLATTEN_CONTENT = (
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set ns = namespace(text='') %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set ns.text = ns.text + '<image>\n' %}"
    "{% elif item['type'] == 'text' %}{% set ns.text = ns.text + item['text'] %}{% endif %}"
    "{% endfor %}{% set text = ns.text %}{% endif %}"
)
LLAMA3_MULTIMODAL_TEMPLATE = (
    "{% for message in messages %}"
    + _FLATTEN_CONTENT
    + "{% set content = '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' + text | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + _FLATTEN_CONTENT
    + "{% if message['role'] == 'assistant' %}"
    "{{ text | trim + '<|end_of_text|>' }}{% elif message['role'] == 'user' %}{{ text | trim + '\n' }}"
    "{% endif %}{% endfor %}"
)

_SYSTEM_OR_DEFAULT = (
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = default_system %}"
    "{% set loop_messages = messages %}{% endif %}"
)
LLAMA2_IT_CHAT_TEMPLATE = (
    '{% set default_system = "'
    + LLAMANTINO2_SYSTEM_PROMPT
    + '" %}'
    + _SYSTEM_OR_DEFAULT
    + "{% set ns = namespace(first=true) %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if ns.first %}{{ '<s> [INST]<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% set ns.first = false %}"
    "{% else %}{{ ' <s> [INST]' }}{% endif %}"
    "{{ message['content'] | trim + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' </s>' }}{% endif %}"
    "{% endfor %}"
)
ALPACA_IT_TEMPLATE = (
    "{% set ns = namespace(previous='', has_input=false) %}{% for message in messages %}"
    "{% if message['role'] == 'user' and ns.previous == 'user' %}{% set ns.has_input = true %}{% endif %}"
    "{% set ns.previous = message['role'] %}{% endfor %}"
    '{% if ns.has_input %}{% set default_system = "'
    + ALPACA_IT_PREAMBLE
    + '" %}{% else %}{% set default_system = "'
    + ALPACA_IT_NO_INPUT_PREAMBLE
    + '" %}{% endif %}'
    + _SYSTEM_OR_DEFAULT
    + "{{ '<s>' + system }}{% set ns.previous = '' %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if ns.previous == 'user' %}{{ '\n\n### Input:\n' }}{% else %}{{ '\n\n### Istruzione:\n' }}{% endif %}"
    "{{ message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %}{{ '\n\n### Risposta:\n' + message['content'] | trim + '</s>' }}"
    "{% endif %}{% set ns.previous = message['role'] %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Risposta:\n' }}{% endif %}"
)
LLAMA3_ANITA_TEMPLATE = (
    '{% set default_system = "' + ANITA_SYSTEM_PROMPT + '" %}'
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{% set messages = [{'role': 'system', 'content': default_system}] + messages %}{% endif %}"
    + LLAMA3_MULTIMODAL_TEMPLATE
)
LLAMA3_ANITA_SCRIPT_TEMPLATE = (
    "{{ bos_token + ' ' }}{% for message in messages %}"
    + _FLATTEN_CONTENT
    + "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + text | trim + ' <|eot_id|> ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% else %}{{ '<|end_of_text|>' }}{% endif %}"
)

TEMPLATES: dict[str, Template] = {
    "llama3": Template(
        name="llama3",
        description="LLaMA-3 chat as LLaVA-NDiNO uses it: no system prompt unless the sample has one",
        render=_llama3_render,
        generation_prompt=_llama3_generation_prompt,
        chat_template=LLAMA3_MULTIMODAL_TEMPLATE,
        stop_token=EOT,
    ),
    "plain": Template(
        name="plain",
        description="align/adapt pre-training: the image (and any prompt text), then the target text",
        render=_plain_render,
        generation_prompt=_plain_generation_prompt,
        chat_template=PLAIN_TEMPLATE,
        stop_token=END_OF_TEXT,
    ),
    "llama2-it-chat": Template(
        name="llama2-it-chat",
        description="LLaMAntino-2 chat, as its model cards write it: [INST]<<SYS>> with the Italian system prompt",
        render=_llama2_render,
        generation_prompt=_llama2_generation_prompt,
        chat_template=LLAMA2_IT_CHAT_TEMPLATE,
        stop_token=LLAMA2_EOS,
        added_tokens=(LLAMA2_BOS, LLAMA2_EOS),
    ),
    "alpaca-it": Template(
        name="alpaca-it",
        description=(
            "LLaMAntino-2 instruction models: Italian Alpaca preamble (with or without input), "
            "### Istruzione: / ### Input: / ### Risposta:"
        ),
        render=_alpaca_render,
        generation_prompt=_alpaca_generation_prompt,
        chat_template=ALPACA_IT_TEMPLATE,
        stop_token=LLAMA2_EOS,
        added_tokens=(LLAMA2_BOS, LLAMA2_EOS),
    ),
    "llama3-anita": Template(
        name="llama3-anita",
        description="LLaMAntino-3-ANITA: LLaMA-3 chat with ANITA's Italian system prompt by default",
        render=_with_system(_llama3_render, ANITA_SYSTEM_PROMPT),
        generation_prompt=_anita_generation_prompt,
        chat_template=LLAMA3_ANITA_TEMPLATE,
        stop_token=EOT,
    ),
    "llama3-anita-script": Template(
        name="llama3-anita-script",
        description=(
            "LLaMAntino-3-ANITA's public SFT script: LLaMA-3 chat with ' <|eot_id|> ' spacing and a final "
            "<|end_of_text|>, no system prompt unless the sample has one"
        ),
        render=_anita_script_render,
        generation_prompt=_anita_script_generation_prompt,
        chat_template=LLAMA3_ANITA_SCRIPT_TEMPLATE,
        stop_token=EOT,
    ),
}

TRAIN_ON = ("assistant", "all")
"""Which tokens of a rendered sft sample carry loss: the template's trained segments (the answers), or
every token of the rendered text (padding aside), as trainers that train on a plain text field do."""


def get_template(name: str) -> Template:
    """Return the registered template ``name`` or raise listing the known ones."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def llava_chat_template() -> str:
    """Return the Jinja chat template stored in assembled processors (LLaMA-3, multimodal)."""
    return LLAMA3_MULTIMODAL_TEMPLATE
