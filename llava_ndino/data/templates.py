"""Conversation templates: the one source of truth for prompt text and for which tokens carry loss.

A template renders a list of messages into segments; each segment says whether its tokens are
trained. The training pipeline masks labels from these segments, and the Jinja chat template that
ships inside exported processors renders the same text (tests check both against each other and
against Meta's LLaMA-3 template).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llava_ndino.model.tokenizer import BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, START_HEADER

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
}


def get_template(name: str) -> Template:
    """Return the registered template ``name`` or raise listing the known ones."""
    if name not in TEMPLATES:
        raise KeyError(f"unknown template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def llava_chat_template() -> str:
    """Return the Jinja chat template stored in assembled processors (LLaMA-3, multimodal)."""
    return LLAMA3_MULTIMODAL_TEMPLATE
