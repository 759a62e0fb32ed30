"""Turn a parsed conversation into model inputs: expanded image tokens, labels, pixel values.

Text and image tokens come from transformers' ``LlavaNextProcessor`` (so the number of image
tokens is exactly the processor's), and labels come from the template's trained segments, located
in the processor's output through the tokenizer's character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import LlavaNextProcessor

from llava_ndino.data.conversation import (
    SampleError,
    control_token_pattern,
    guard_control_tokens,
    parse_sample,
)
from llava_ndino.data.images import DEFAULT_MAX_PIXELS, ImageBytes, image_path, load_image
from llava_ndino.formats.prompts import IMAGE_PLACEHOLDER, Template, get_template

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    """Model inputs for one sample; image tensors are None for text-only samples."""

    sample_id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None


class ConversationEncoder:
    """Encode LLaVA/OpenAI samples with a processor and a template, enforcing ``max_length``."""

    def __init__(
        self,
        processor: LlavaNextProcessor,
        template: str | Template = "llama3",
        max_length: int = 8192,
        image_root: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
        control_tokens: str = "skip",
    ):
        self.processor = processor
        self.allow_outside_root = allow_outside_root
        self.control_tokens = control_tokens
        self.control_pattern = control_token_pattern(processor.tokenizer, allowed=(IMAGE_PLACEHOLDER,))
        self.template = get_template(template) if isinstance(template, str) else template
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root else None
        self.max_pixels = max_pixels
        self.image_token_id = processor.image_token_id

    def load_images(self, refs: list[str], sample_id: str) -> list[Image.Image]:
        """Load the sample's images relative to ``image_root``."""
        root = self.image_root or Path(".")
        return [
            load_image(image_path(root, ref, sample_id, self.allow_outside_root), sample_id, self.max_pixels)
            for ref in refs
        ]

    def encode(
        self, sample: dict, index: int = 0, images: list[Image.Image | ImageBytes] | None = None
    ) -> EncodedSample:
        """Encode one raw sample; ``images`` (PIL images or encoded bytes, e.g. from shards) override
        loading from disk.

        Raises :class:`SampleError` for malformed samples and for samples whose truncation to
        ``max_length`` would cut into (or drop) image tokens.
        """
        conversation = parse_sample(sample, index)
        sample_id = conversation.sample_id
        messages = guard_control_tokens(
            conversation.messages, self.control_pattern, sample_id, self.control_tokens
        )
        if images is None:
            images = self.load_images(conversation.images, sample_id)
        elif len(images) != len(conversation.images):
            raise SampleError(sample_id, "image_count_mismatch", f"{len(images)} images given for the sample")
        else:
            images = [
                load_image(i, sample_id, self.max_pixels) if isinstance(i, ImageBytes) else i for i in images
            ]
        segments = self.template.render(messages)
        text = "".join(s.text for s in segments)
        enc = self.processor(
            images=images or None,
            text=[text],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"][0]
        labels = self._labels(segments, input_ids, enc["offset_mapping"][0], sample_id)
        if input_ids.numel() > self.max_length:
            image_positions = (input_ids == self.image_token_id).nonzero()
            if image_positions.numel() and int(image_positions.max()) >= self.max_length:
                raise SampleError(
                    sample_id,
                    "truncated_image",
                    f"is {input_ids.numel()} tokens long and max_length={self.max_length} would cut its image "
                    "tokens; raise data.max_length or drop the sample",
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE_INDEX).any():
            raise SampleError(sample_id, "no_target", "has no answer tokens left within max_length")
        return EncodedSample(
            sample_id=sample_id,
            input_ids=input_ids,
            labels=labels,
            pixel_values=enc.get("pixel_values") if images else None,
            image_sizes=enc.get("image_sizes") if images else None,
        )

    def _labels(
        self, segments, input_ids: torch.Tensor, offsets: torch.Tensor, sample_id: str
    ) -> torch.Tensor:
        """Label every token that starts inside a trained segment of the image-expanded text."""
        run_lengths = _image_run_lengths(input_ids, self.image_token_id)
        placeholders = sum(s.text.count(IMAGE_PLACEHOLDER) for s in segments)
        if len(run_lengths) != placeholders:
            raise SampleError(
                sample_id,
                "adjacent_images",
                f"{placeholders} <image> placeholders gave {len(run_lengths)} image-token runs: "
                "separate adjacent <image> placeholders with text or a newline",
            )
        spans, cursor, image_index = [], 0, 0
        for segment in segments:
            expanded = 0
            for _ in range(segment.text.count(IMAGE_PLACEHOLDER)):
                expanded += (run_lengths[image_index] - 1) * len(self.processor.image_token)
                image_index += 1
            end = cursor + len(segment.text) + expanded
            if segment.train:
                spans.append((cursor, end))
            cursor = end
        return labels_in_spans(input_ids, offsets, spans)


def labels_in_spans(
    input_ids: torch.Tensor, offsets: torch.Tensor, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Labels for the tokens whose first character (``offsets[:, 0]``) lies in a ``[start, end)`` span; -100 elsewhere."""
    starts = offsets[:, 0]
    trained = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in spans:
        trained |= (starts >= start) & (starts < end)
    return torch.where(trained, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def _image_run_lengths(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the consecutive runs of ``image_token_id`` (one run per image)."""
    is_image = (input_ids == image_token_id).int()
    starts = ((is_image[1:] - is_image[:-1]) == 1).nonzero().flatten() + 1
    ends = ((is_image[1:] - is_image[:-1]) == -1).nonzero().flatten() + 1
    if is_image.numel() and is_image[0]:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype), starts])
    if is_image.numel() and is_image[-1]:
        ends = torch.cat([ends, torch.tensor([is_image.numel()], dtype=ends.dtype)])
    return (ends - starts).tolist()


def collate(samples: list[EncodedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch with the dedicated pad token; concatenate images, padding their tile count."""
    longest = max(s.input_ids.numel() for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.numel()
        input_ids[row, :n] = sample.input_ids
        labels[row, :n] = sample.labels
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        **stack_images(samples),
    }


def stack_images(samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
    """Concatenate the samples' images in order, zero-padding their tile count; empty when there are none."""
    pixels = [s.pixel_values for s in samples if s.pixel_values is not None]
    if not pixels:
        return {}
    tiles = max(p.shape[1] for p in pixels)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels]
    sizes = [s.image_sizes for s in samples if s.image_sizes is not None]
    return {"pixel_values": torch.cat(padded), "image_sizes": torch.cat(sizes)}
