"""Image-token expansion in ``data.encode``: our encoder against plain transformers, and token counts
against counts worked out by hand for five sizes.

The reference is ``AutoProcessor`` loaded from an assembled folder (chat template, then the processor
on text and image); the expected counts come from a small independent formula: the best-fit pinpoint,
the unpadded grid with HF's rounding, a newline per row, plus the 576 base-tile tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava_ndino.data.encode import IGNORE_INDEX, ConversationEncoder, collate

TILE, PATCH = 336, 14
PINPOINTS_HW = [(672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336)]
QUESTION, ANSWER = "Cosa vedi in questa immagine?", "Un quadrato viola su sfondo chiaro."

# (H, W): extreme ratios, tiny, large, the pinpoints themselves, the worked examples and odd sizes
SIZES = [
    (1, 4000),
    (4000, 1),
    (1, 1),
    (10, 10),
    (3000, 4000),
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
    (336, 336),
    (480, 640),
    (1080, 1920),
    (720, 1280),
    (1024, 768),
    (500, 500),
    (335, 337),
    (100, 3000),
    (2000, 300),
    (1, 2),
    (2, 1),
    (337, 1009),
]

# image tokens per (H, W), worked out by hand (base tile 576 + unpadded grid + a newline per row)
WORKED_COUNTS = {(336, 336): 1176, (480, 640): 2340, (1080, 1920): 1948, (336, 1008): 2328, (672, 672): 2928}


def best_pinpoint(height: int, width: int) -> tuple[int, int]:
    """LLaVA-NeXT's best fit: the largest effective resolution, then the least wasted area."""
    best, best_effective, best_wasted = PINPOINTS_HW[0], -1, float("inf")
    for ph, pw in PINPOINTS_HW:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def expected_image_tokens(height: int, width: int) -> int:
    """576 + H'·W' + H': base tile, unpadded anyres grid (HF rounding) and one newline per row."""
    side = TILE // PATCH
    ph, pw = best_pinpoint(height, width)
    rows, cols = ph // TILE * side, pw // TILE * side
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return side * side + rows * cols + rows


def make_image(height: int, width: int) -> Image.Image:
    """A two-colour RGB image of ``height`` x ``width`` pixels."""
    image = Image.new("RGB", (width, height), (120, 30, 200))
    image.paste((250, 240, 10), (0, 0, max(1, width // 2), max(1, height // 2)))
    return image


def one_image_sample(sample_id: str = "img") -> dict:
    return {
        "id": sample_id,
        "image": "unused.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"},
            {"from": "gpt", "value": ANSWER},
        ],
    }


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def encoder(processor) -> ConversationEncoder:
    return ConversationEncoder(processor, "llama3")


@pytest.fixture(scope="module")
def model(tiny_llava_dir) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()


def reference_input_ids(processor, image: Image.Image) -> torch.Tensor:
    """What plain transformers gives for the same one-turn conversation."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    ]
    text = processor.apply_chat_template(messages)
    inputs = processor(images=[image], text=[text], add_special_tokens=False, return_tensors="pt")
    return inputs["input_ids"][0]


def test_formula_matches_the_worked_examples():
    for (height, width), tokens in WORKED_COUNTS.items():
        assert expected_image_tokens(height, width) == tokens, (height, width)


@pytest.mark.parametrize(("height", "width"), SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_encoder_matches_transformers(processor, encoder, height, width):
    image = make_image(height, width)
    encoded = encoder.encode(one_image_sample(), images=[image])
    assert encoded.input_ids.tolist() == reference_input_ids(processor, image).tolist()
    count = int((encoded.input_ids == processor.image_token_id).sum())
    assert count == expected_image_tokens(height, width)
    if (height, width) in WORKED_COUNTS:
        assert count == WORKED_COUNTS[(height, width)]
    assert encoded.image_sizes.tolist() == [[height, width]]  # HF image_sizes are (H, W)
    # image tokens carry no labels
    assert (encoded.labels[encoded.input_ids == processor.image_token_id] == IGNORE_INDEX).all()


@pytest.mark.parametrize(("height", "width"), [(336, 336), (480, 640), (1, 4000), (4000, 1)])
def test_forward_accepts_single_sample(model, encoder, height, width):
    encoded = encoder.encode(one_image_sample(), images=[make_image(height, width)])
    batch = collate([encoded], pad_token_id=encoder.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape == (1, encoded.input_ids.numel(), model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_forward_batch_of_two_sizes_with_padded_tiles(model, encoder):
    small = encoder.encode(one_image_sample("small"), images=[make_image(336, 336)])  # 3 tiles
    large = encoder.encode(one_image_sample("large"), images=[make_image(336, 1008)])  # 4 tiles
    assert small.pixel_values.shape[1] < large.pixel_values.shape[1]
    pad_id = encoder.processor.tokenizer.pad_token_id
    batch = collate([small, large], pad_token_id=pad_id)
    assert batch["pixel_values"].shape[:2] == (2, large.pixel_values.shape[1])
    assert batch["image_sizes"].tolist() == [[336, 336], [336, 1008]]
    n_small = small.input_ids.numel()
    assert (batch["input_ids"][0, n_small:] == pad_id).all()
    assert (batch["labels"][0, n_small:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].sum() == n_small
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = model(**{k: v for k, v in collate([small], pad_id).items() if k != "labels"}).logits
    assert logits.shape == (2, large.input_ids.numel(), model.config.text_config.vocab_size)
    # the padded tiles and right padding do not change the smaller sample's logits
    torch.testing.assert_close(logits[0, :n_small], alone[0], atol=1e-4, rtol=1e-4)


def test_forward_batch_mixing_text_only_and_image_samples(model, encoder):
    text_only = encoder.encode(
        {"id": "t", "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}]}
    )
    with_image = encoder.encode(one_image_sample(), images=[make_image(10, 10)])
    batch = collate([text_only, with_image], pad_token_id=encoder.processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 1 and batch["image_sizes"].tolist() == [[10, 10]]
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (2, with_image.input_ids.numel(), model.config.text_config.vocab_size)


def test_forward_batch_with_a_two_image_sample(model, encoder):
    two = {
        "id": "two",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": f"<image>\nPrima e <image>\nseconda: {QUESTION}"},
            {"from": "gpt", "value": ANSWER},
        ],
    }
    first = encoder.encode(two, images=[make_image(20, 20), make_image(1008, 336)])  # 3 and 4 tiles
    second = encoder.encode(one_image_sample(), images=[make_image(10, 10)])  # 3 tiles
    pad_id = encoder.processor.tokenizer.pad_token_id
    batch = collate([first, second], pad_token_id=pad_id)
    assert batch["pixel_values"].shape[:2] == (3, 4)
    assert batch["image_sizes"].tolist() == [[20, 20], [1008, 336], [10, 10]]
    labels = batch.pop("labels")
    with torch.no_grad():
        out = model(**batch, labels=labels)
        alone = model(**{k: v for k, v in collate([first], pad_id).items() if k != "labels"}).logits
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits[0, : first.input_ids.numel()], alone[0], atol=1e-4, rtol=1e-4)
