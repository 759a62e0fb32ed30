"""Text-only training data for the LLaMAntino recipes: raw text packed into blocks (clm),
instructions and chats (sft) and preference pairs (dpo).

Row formats (JSONL, or a JSON list, read by :func:`~llava_ndino.data.dataset.read_records`):

- raw text: ``{"text"}``;
- instruction: ``{"instruction", "input", "output"}`` (dolly-15k-it style; ``input`` may be empty);
- chat: ``{"messages": [{"role", "content"}, ...]}`` (UltraChat style);
- preference: ``{"prompt", "chosen", "rejected"}``, each a string or a message list; when
  ``chosen``/``rejected`` are whole conversations (orpo-dpo-mix-40k style), their shared prefix is
  the prompt and their last assistant turn the answer.

Which tokens carry loss comes from the template registry (:mod:`llava_ndino.formats.prompts`), as
for the vision data; sft can instead train on every token (``data.train_on=all``). Bad rows become :class:`~llava_ndino.data.dataset.Skipped` and the loop
counts and lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava_ndino.data.conversation import (
    Conversation,
    SampleError,
    control_token_pattern,
    guard_control_tokens,
    openai_messages,
    parse_sample,
)
from llava_ndino.data.dataset import Batch, Skipped
from llava_ndino.data.encode import IGNORE_INDEX, EncodedSample, collate, labels_in_spans
from llava_ndino.formats.prompts import TRAIN_ON, Message, Segment, Template


def _sample_id(record: object, index: int) -> str:
    return str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"


def _nonempty(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def text_conversation(record: object, index: int) -> Conversation:
    """Parse an instruction row or a chat row into messages.

    An instruction becomes a user turn, its non-empty ``input`` a second user turn (templates such
    as ``alpaca-it`` render it under ``### Input:``) and its ``output`` the assistant turn.
    """
    sample_id = _sample_id(record, index)
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", "a row must be a JSON object")
    if "messages" in record or "conversations" in record:
        conversation = parse_sample(record, index)
        if conversation.images:
            raise SampleError(sample_id, "image_in_text", "has images; text objectives take text only")
        return conversation
    if "instruction" not in record:
        raise SampleError(
            sample_id, "malformed", "needs 'messages' (chat) or 'instruction'/'output' (instruction) fields"
        )
    instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
    if not _nonempty(instruction) or not _nonempty(output):
        raise SampleError(sample_id, "malformed", "'instruction' and 'output' must be non-empty strings")
    if extra is not None and not isinstance(extra, str):
        raise SampleError(sample_id, "malformed", f"'input' must be a string, got {type(extra).__name__}")
    messages = [Message("user", instruction)]
    if extra and extra.strip():
        messages.append(Message("user", extra))
    return Conversation(sample_id, [*messages, Message("assistant", output)])


def encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``text`` (no special tokens added) and labels on the tokens that start in ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    input_ids = enc["input_ids"][0]
    return input_ids, labels_in_spans(input_ids, enc["offset_mapping"][0], spans)


def trained_spans(segments: list[Segment]) -> list[tuple[int, int]]:
    """Character spans of the segments that carry loss."""
    spans, cursor = [], 0
    for segment in segments:
        if segment.train:
            spans.append((cursor, cursor + len(segment.text)))
        cursor += len(segment.text)
    return spans


class SftEncoder:
    """Encode instruction/chat rows with a template.

    ``train_on="assistant"`` puts loss on the template's trained segments (the answers and their stop
    token); ``"all"`` on every token of the rendered text, as a trainer fed a plain text field does
    (LLaMAntino-3-ANITA's ``finetune_llama3.py``); padding never carries loss.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: Template,
        max_length: int,
        control_tokens: str = "skip",
        train_on: str = "assistant",
    ):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.control_tokens, self.control_pattern = control_tokens, control_token_pattern(tokenizer)
        self.train_on = train_on

    def encode(self, record: dict, index: int = 0, images: None = None) -> EncodedSample:
        """Encode one row (``images`` is accepted for the record-source interface and must be None)."""
        conversation = text_conversation(record, index)
        messages = guard_control_tokens(
            conversation.messages, self.control_pattern, conversation.sample_id, self.control_tokens
        )
        segments = self.template.render(messages)
        text = "".join(s.text for s in segments)
        spans = trained_spans(segments) if self.train_on == "assistant" else [(0, len(text))]
        input_ids, labels = encode_spans(self.tokenizer, text, spans)
        input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE_INDEX).any():
            raise SampleError(conversation.sample_id, "no_target", "has no answer tokens within max_length")
        return EncodedSample(conversation.sample_id, input_ids, labels, None, None)


@dataclass
class PreferenceSample:
    """A prompt with its chosen and rejected answers, each encoded with labels on the answer only."""

    sample_id: str
    chosen: EncodedSample
    rejected: EncodedSample


def _preference_side(value: object, key: str, sample_id: str) -> tuple[list[Message], str]:
    """(conversation before the answer, answer text) of a ``chosen``/``rejected`` value."""
    if _nonempty(value):
        return [], str(value)
    if isinstance(value, list) and value:
        messages = openai_messages(value, sample_id)
        if messages[-1].role != "assistant" or not messages[-1].content.strip():
            raise SampleError(sample_id, "malformed", f"'{key}' must end with a non-empty assistant message")
        return messages[:-1], messages[-1].content
    raise SampleError(sample_id, "malformed", f"'{key}' must be a non-empty string or a message list")


def parse_preference(record: object, index: int) -> tuple[str, list[Message], str, str]:
    """Return (sample id, prompt messages, chosen answer, rejected answer) of a preference row."""
    sample_id = _sample_id(record, index)
    if not isinstance(record, dict):
        raise SampleError(sample_id, "malformed", "a row must be a JSON object")
    chosen_prefix, chosen = _preference_side(record.get("chosen"), "chosen", sample_id)
    rejected_prefix, rejected = _preference_side(record.get("rejected"), "rejected", sample_id)
    if chosen_prefix != rejected_prefix:
        raise SampleError(
            sample_id, "prompt_mismatch", "'chosen' and 'rejected' continue different conversations"
        )
    prompt_value = record.get("prompt")
    if chosen_prefix:
        prompt = chosen_prefix
    elif _nonempty(prompt_value):
        prompt = [Message("user", str(prompt_value))]
    elif isinstance(prompt_value, list) and prompt_value:
        prompt = openai_messages(prompt_value, sample_id)
    else:
        raise SampleError(sample_id, "malformed", "needs a 'prompt' (string or message list)")
    if prompt[-1].role != "user":
        raise SampleError(sample_id, "malformed", "the prompt must end with a user message")
    return sample_id, prompt, chosen, rejected


class PreferenceEncoder:
    """Encode preference rows: prompts keep their last ``max_prompt_length`` tokens, pairs their first ``max_length``."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: Template,
        max_length: int,
        max_prompt_length: int,
        control_tokens: str = "skip",
    ):
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.control_tokens, self.control_pattern = control_tokens, control_token_pattern(tokenizer)

    def encode(self, record: dict, index: int = 0, images: None = None) -> PreferenceSample:
        """Encode one row (``images`` is accepted for the record-source interface and must be None)."""
        sample_id, prompt, chosen, rejected = parse_preference(record, index)
        answers = [Message("assistant", chosen), Message("assistant", rejected)]
        guarded = guard_control_tokens(
            [*prompt, *answers], self.control_pattern, sample_id, self.control_tokens
        )
        prompt, chosen, rejected = guarded[: len(prompt)], guarded[-2].content, guarded[-1].content
        prompt_text = self.template.generation_prompt(prompt)
        return PreferenceSample(
            sample_id,
            self._answer(sample_id, prompt, prompt_text, chosen),
            self._answer(sample_id, prompt, prompt_text, rejected),
        )

    def _answer(self, sample_id: str, prompt: list[Message], prompt_text: str, answer: str) -> EncodedSample:
        text = "".join(s.text for s in self.template.render([*prompt, Message("assistant", answer)]))
        if not text.startswith(prompt_text):
            raise SampleError(
                sample_id, "template", f"template {self.template.name} does not extend the prompt"
            )
        input_ids, labels = encode_spans(self.tokenizer, text, [(len(prompt_text), len(text))])
        answer_tokens = (labels != IGNORE_INDEX).nonzero()
        if answer_tokens.numel() == 0:
            raise SampleError(sample_id, "no_target", "has an empty answer")
        cut = max(int(answer_tokens[0]) - self.max_prompt_length, 0)
        input_ids, labels = input_ids[cut:][: self.max_length], labels[cut:][: self.max_length]
        if not (labels != IGNORE_INDEX).any():
            raise SampleError(sample_id, "no_target", "has no answer tokens within max_length")
        return EncodedSample(sample_id, input_ids, labels, None, None)


class PreferenceCollator:
    """Pad pairs into one batch: the chosen rows first, then the rejected rows in the same order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[PreferenceSample | Skipped]) -> Batch:
        good = [i for i in items if isinstance(i, PreferenceSample)]
        skipped = [i for i in items if isinstance(i, Skipped)]
        rows = [p.chosen for p in good] + [p.rejected for p in good]
        return Batch(collate(rows, self.pad_token_id) if good else {}, len(items), skipped)


@dataclass
class PackedBlock:
    """One fixed-length block of the token stream, the document index of each token, and the bad
    rows whose place in the stream falls in this block (so the loop lists them)."""

    input_ids: torch.Tensor
    documents: torch.Tensor
    skipped: list[Skipped]


class PackedText(Dataset):
    """Raw-text rows tokenized as ``bos text eos``, joined and cut into blocks of ``block_size`` tokens.

    The tail shorter than a block is dropped. Rows without usable text are skipped; the skip ratio
    of packed data is counted per block. The whole file is tokenized up front, in memory.
    """

    def __init__(self, records: list, tokenizer: PreTrainedTokenizerBase, block_size: int):
        self.block_size = block_size
        texts: list[str] = []
        bad: dict[int, Skipped] = {}
        for index, record in enumerate(records):
            text = record.get("text") if isinstance(record, dict) else None
            if _nonempty(text):
                texts.append(text)
            else:
                sample_id = _sample_id(record, index)
                bad[index] = Skipped(sample_id, "no_text", f"sample {sample_id!r}: needs a non-empty 'text'")
        # raw text is text: a literal "<|eot_id|>" in a document must not become the control token
        encoded = iter(
            tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            if texts
            else []
        )
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        tokens: list[int] = []
        documents: list[int] = []
        positions = []  # (stream position, skipped row), in row order
        for index in range(len(records)):
            if index in bad:
                positions.append((len(tokens), bad[index]))
                continue
            piece = bos + next(encoded) + [tokenizer.eos_token_id]
            documents += [documents[-1] + 1 if documents else 0] * len(piece)
            tokens += piece
        self.blocks = len(tokens) // block_size
        if self.blocks == 0:
            raise ValueError(
                f"the text data has {len(tokens)} tokens, fewer than one block of data.max_length={block_size}: "
                "add text or lower data.max_length"
            )
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.documents = torch.tensor(documents, dtype=torch.long)
        self.skipped: dict[int, list[Skipped]] = {}
        for position, item in positions:
            self.skipped.setdefault(min(position // block_size, self.blocks - 1), []).append(item)

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, index: int) -> PackedBlock:
        window = slice(index * self.block_size, (index + 1) * self.block_size)
        return PackedBlock(self.tokens[window], self.documents[window], self.skipped.get(index, []))


class PackedCollator:
    """Stack packed blocks; with ``isolate`` positions restart at every document and the first token of
    each document carries no label, so attention and loss never cross a document boundary."""

    def __init__(self, isolate: bool):
        self.isolate = isolate

    def __call__(self, items: list[PackedBlock]) -> Batch:
        input_ids = torch.stack([b.input_ids for b in items])
        labels = input_ids.clone()
        tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
        if self.isolate:
            documents = torch.stack([b.documents for b in items])
            starts = torch.ones_like(documents, dtype=torch.bool)
            starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
            index = torch.arange(documents.shape[1]).expand_as(documents)
            tensors["position_ids"] = index - torch.where(starts, index, 0).cummax(dim=1).values
            labels[starts] = IGNORE_INDEX
        return Batch(tensors, len(items), [s for b in items for s in b.skipped])
