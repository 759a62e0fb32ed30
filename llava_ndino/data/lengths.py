"""Token lengths of samples without decoding pixels: image sizes come from file headers.

The number of image tokens of an image depends only on its (EXIF-upright) size, so
:class:`LengthEstimator` reads image headers, asks ``LlavaNextProcessor`` for the token count of
that size, tokenises the text with ``<image>`` as one token and expands it. The result equals the
length :class:`~llava_ndino.data.encode.ConversationEncoder` produces, and the same rejection
reasons (truncated image tokens, nothing left to train, broken samples) are found before training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from llava_ndino.data.conversation import (
    SampleError,
    control_token_pattern,
    guard_control_tokens,
    parse_sample,
)
from llava_ndino.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageBytes,
    decode_errors,
    image_path,
    is_file,
    load_image,
    open_image,
)
from llava_ndino.formats.prompts import IMAGE_PLACEHOLDER, Template, get_template

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


@dataclass
class Measure:
    """What a sample would become: its full token length (before truncation) or why it is rejected."""

    sample_id: str
    length: int = 0
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) of each image, upright."""
    truncated: bool = False
    """The sample is longer than max_length and loses its tail (but keeps its image tokens)."""
    reason: str | None = None
    """Rejection code (as :class:`SampleError` gives it), None for a usable sample."""
    message: str = ""

    @property
    def has_image(self) -> bool:
        """True for samples with at least one image."""
        return bool(self.image_sizes)


def header_size(path: Path | ImageBytes, sample_id: str, max_pixels: int) -> tuple[int, int]:
    """Upright (height, width) of the image at ``path`` from its header; raises :class:`SampleError`."""
    if not isinstance(path, ImageBytes) and not is_file(path, sample_id):
        raise SampleError(sample_id, "missing_image", f"image {path} does not exist; check data.image_root")
    with decode_errors(path, sample_id), open_image(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if width * height > max_pixels:
        raise SampleError(
            sample_id,
            "image_too_large",
            f"image {path} has {width}x{height} pixels, above the limit of {max_pixels:,}",
        )
    return (width, height) if orientation in TRANSPOSED_ORIENTATIONS else (height, width)


class LengthEstimator:
    """Measure samples as the encoder would encode them, reading only image headers (or decoding all)."""

    def __init__(
        self,
        processor,
        template: str | Template = "llama3",
        max_length: int = 8192,
        image_root: Path | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode: bool = False,
        allow_outside_root: bool = False,
        control_tokens: str = "skip",
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.max_length = max_length
        self.image_root = Path(image_root) if image_root else Path(".")
        self.max_pixels = max_pixels
        self.decode = decode
        self.allow_outside_root = allow_outside_root
        self.control_tokens = control_tokens
        self.control_pattern = control_token_pattern(processor.tokenizer, allowed=(IMAGE_PLACEHOLDER,))
        self.image_token_id = processor.image_token_id
        crop = processor.image_processor.crop_size
        self.tile = (crop["height"], crop["width"])
        self._tokens_cache: dict[tuple[int, int], int] = {}

    def image_tokens(self, height: int, width: int) -> int:
        """Number of image tokens the processor gives an upright image of ``height`` x ``width``."""
        key = (height, width)
        if key not in self._tokens_cache:
            count = self.processor._get_number_of_features(height, width, *self.tile)
            if self.processor.vision_feature_select_strategy == "default":
                count -= 1
            self._tokens_cache[key] = count
        return self._tokens_cache[key]

    def _sizes(self, refs: list[str | ImageBytes], sample_id: str) -> list[tuple[int, int]]:
        sizes = []
        for ref in refs:
            if isinstance(ref, ImageBytes):
                path = ref
            else:
                path = image_path(self.image_root, ref, sample_id, self.allow_outside_root)
            if self.decode:
                width, height = load_image(path, sample_id, self.max_pixels).size
                sizes.append((height, width))
            else:
                sizes.append(header_size(path, sample_id, self.max_pixels))
        return sizes

    def measure(
        self, record: dict, index: int = 0, images: list[Image.Image | ImageBytes] | None = None
    ) -> Measure:
        """Measure one raw sample; ``images`` (PIL images or encoded bytes) replace the files on disk."""
        sample_id = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        try:
            conversation = parse_sample(record, index)
            sample_id = conversation.sample_id
            if images is None:
                sizes = self._sizes(conversation.images, sample_id)
            else:
                if len(images) != len(conversation.images):
                    raise SampleError(sample_id, "image_count_mismatch", f"{len(images)} images given")
                pil = [(image.height, image.width) for image in images if isinstance(image, Image.Image)]
                sizes = pil or self._sizes([i for i in images if isinstance(i, ImageBytes)], sample_id)
            messages = guard_control_tokens(
                conversation.messages, self.control_pattern, sample_id, self.control_tokens
            )
            return self._measure_text(messages, sizes, sample_id)
        except SampleError as err:
            return Measure(err.sample_id, reason=err.reason, message=str(err))

    def _measure_text(self, messages, sizes: list[tuple[int, int]], sample_id: str) -> Measure:
        segments = self.template.render(messages)
        text = "".join(s.text for s in segments)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"])
        is_image = ids == self.image_token_id
        if int(is_image.sum()) != len(sizes):
            raise SampleError(
                sample_id, "image_count_mismatch", f"{len(sizes)} images for the <image> tokens"
            )
        if bool((is_image[1:] & is_image[:-1]).any()):
            raise SampleError(
                sample_id,
                "adjacent_images",
                "has adjacent <image> placeholders: separate them with text or a newline",
            )
        widths = torch.ones_like(ids)
        widths[is_image] = torch.tensor([self.image_tokens(h, w) for h, w in sizes], dtype=ids.dtype)
        ends = widths.cumsum(0)
        starts = ends - widths
        length = int(ends[-1]) if ids.numel() else 0
        measure = Measure(sample_id, length, sizes, truncated=length > self.max_length)
        if measure.truncated and is_image.any() and int(ends[is_image].max()) > self.max_length:
            raise SampleError(
                sample_id,
                "truncated_image",
                f"is {length} tokens long and max_length={self.max_length} would cut its image "
                "tokens; raise data.max_length or drop the sample",
            )
        trained = torch.zeros_like(ids, dtype=torch.bool)
        offsets = torch.tensor(enc["offset_mapping"]).reshape(-1, 2)[:, 0]
        cursor = 0
        for segment in segments:
            end = cursor + len(segment.text)
            if segment.train:
                trained |= (offsets >= cursor) & (offsets < end)
            cursor = end
        if not bool((trained & ~is_image & (starts < self.max_length)).any()):
            raise SampleError(sample_id, "no_target", "has no answer tokens left within max_length")
        return measure
