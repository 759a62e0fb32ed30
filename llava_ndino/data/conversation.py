"""Parsing of training samples (LLaVA ``conversations`` or OpenAI-style ``messages``) into messages.

Every problem raises :class:`SampleError`, which names the sample and carries a short ``reason``
code that datasets count when they skip bad samples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llava_ndino.formats.prompts import IMAGE_PLACEHOLDER, ROLES, Message, content_to_text

LLAVA_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}


class SampleError(ValueError):
    """A sample that cannot be trained on; ``reason`` is a short code for counting skips."""

    def __init__(self, sample_id: str, reason: str, detail: str):
        super().__init__(f"sample {sample_id!r}: {detail}")
        self.sample_id = sample_id
        self.reason = reason


@dataclass
class Conversation:
    """A parsed sample: its id, its messages and the image references in placeholder order."""

    sample_id: str
    messages: list[Message]
    images: list[str] = field(default_factory=list)


def _image_refs(sample: dict, sample_id: str) -> list[str]:
    refs = sample.get("image", sample.get("images"))
    if refs is None:
        return []
    if isinstance(refs, str):
        return [refs]
    if isinstance(refs, list) and all(isinstance(r, str) for r in refs):
        return list(refs)
    raise SampleError(sample_id, "malformed", f"'image' must be a path or a list of paths, got {refs!r}")


def _llava_messages(turns: list, sample_id: str) -> list[Message]:
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(sample_id, "malformed", f"turn {i} needs 'from' and 'value' keys, got {turn!r}")
        role = LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise SampleError(
                sample_id,
                "unknown_role",
                f"turn {i} has unknown role {turn['from']!r}; use human, gpt or system",
            )
        if not isinstance(turn["value"], str):
            raise SampleError(
                sample_id,
                "bad_turn_value",
                f"turn {i} 'value' must be text, got {type(turn['value']).__name__} {str(turn['value'])[:60]!r}",
            )
        messages.append(Message(role, turn["value"]))
    return messages


def openai_messages(turns: list, sample_id: str) -> list[Message]:
    """Parse OpenAI-style ``{"role", "content"}`` turns; raises :class:`SampleError` naming the turn."""
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise SampleError(
                sample_id, "malformed", f"message {i} needs 'role' and 'content' keys, got {turn!r}"
            )
        if turn["role"] not in ROLES:
            raise SampleError(
                sample_id,
                "unknown_role",
                f"message {i} has unknown role {turn['role']!r}; use {', '.join(ROLES)}",
            )
        if not isinstance(turn["content"], str | list):
            raise SampleError(
                sample_id,
                "bad_turn_value",
                f"message {i} 'content' must be text or a list of items, got {type(turn['content']).__name__}",
            )
        try:
            messages.append(Message(turn["role"], content_to_text(turn["content"])))
        except (ValueError, AttributeError, TypeError) as err:
            raise SampleError(sample_id, "malformed", f"message {i}: {err}") from err
    return messages


def parse_sample(sample: dict, index: int = 0) -> Conversation:
    """Parse one LLaVA or OpenAI-style sample and check it is trainable.

    Raises :class:`SampleError` when the ``<image>`` count differs from the image count, when no
    assistant turn exists, when a role is unknown, a turn's value is not text, an assistant turn is
    empty or holds an image.
    """
    sample_id = str(sample.get("id", f"#{index}")) if isinstance(sample, dict) else f"#{index}"
    if not isinstance(sample, dict):
        raise SampleError(sample_id, "malformed", "a sample must be a JSON object")
    if isinstance(sample.get("conversations"), list):
        messages = _llava_messages(sample["conversations"], sample_id)
    elif isinstance(sample.get("messages"), list):
        messages = openai_messages(sample["messages"], sample_id)
    else:
        raise SampleError(
            sample_id, "malformed", "needs a 'conversations' (LLaVA) or 'messages' (OpenAI) list"
        )
    images = _image_refs(sample, sample_id)
    for message in messages:
        try:
            message.content.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. a lone surrogate from a "\udc80" JSON escape
            raise SampleError(
                sample_id, "bad_text", f"a {message.role} turn is not valid Unicode ({err.reason})"
            ) from None
    if not any(m.role == "assistant" for m in messages):
        raise SampleError(
            sample_id, "no_assistant", "has no assistant (gpt) turn, so nothing would be trained"
        )
    if any(not m.content.strip() for m in messages if m.role == "assistant"):
        raise SampleError(
            sample_id,
            "empty_answer",
            "an assistant turn is empty, so it would train a bare end-of-turn token",
        )
    if any(IMAGE_PLACEHOLDER in m.content for m in messages if m.role == "assistant"):
        raise SampleError(
            sample_id, "image_in_answer", "an assistant turn contains <image>; images go in user turns"
        )
    placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        raise SampleError(
            sample_id,
            "image_count_mismatch",
            f"has {placeholders} <image> placeholder(s) but {len(images)} image(s); "
            "put one <image> in the text per image file",
        )
    return Conversation(sample_id, messages, images)


CONTROL_TOKEN_MODES = ("skip", "escape")
"""What to do with data text that spells a tokenizer control token (``data.control_tokens``)."""
ESCAPE = "\u2060"
"""Word joiner, inserted after the first character of a control-token string so that it is tokenised
as plain text; it is invisible when the text is shown."""


def control_token_pattern(tokenizer, allowed: tuple[str, ...] = ()) -> re.Pattern | None:
    """A pattern matching every special-token string of ``tokenizer`` but ``allowed`` (e.g. ``<image>``
    in VLM user turns, where it marks an image), or None when there is none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {t.content for t in decoder.values() if getattr(t, "special", False)} - set(allowed)
    tokens |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t not in allowed}
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def escape_control_tokens(text: str, pattern: re.Pattern | None) -> str:
    """``text`` with every control-token string broken by :data:`ESCAPE` (read as text, shown unchanged)."""
    if pattern is None:
        return text
    return pattern.sub(lambda m: m.group(0)[0] + ESCAPE + m.group(0)[1:], text)


def guard_control_tokens(
    messages: list[Message], pattern: re.Pattern | None, sample_id: str, mode: str = "skip"
) -> list[Message]:
    """Return ``messages`` when no text spells a control token; otherwise skip the sample (reason
    ``control_token_in_text``) or escape the strings, as ``mode`` says. Data text is text: a user turn
    holding ``<|eot_id|><|start_header_id|>assistant`` must not forge an assistant turn."""
    if pattern is None:
        return messages
    found = next((m for m in messages if pattern.search(m.content)), None)
    if found is None:
        return messages
    if mode == "escape":
        return [Message(m.role, escape_control_tokens(m.content, pattern)) for m in messages]
    token = pattern.search(found.content).group(0)
    raise SampleError(
        sample_id,
        "control_token_in_text",
        f"a {found.role} turn spells the control token {token!r}, which would be read as a real one; "
        "set data.control_tokens=escape to train on such text as plain text",
    )
