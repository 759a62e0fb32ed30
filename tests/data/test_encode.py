"""The conversation encoder (``data.encode``): label masking checked against decoded text, truncation
that never cuts an image, a dedicated pad token that stays out of the loss, and bad samples."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.encode import IGNORE_INDEX, ConversationEncoder, collate
from llava_ndino.formats.tokens import BEGIN_OF_TEXT, END_OF_TEXT, EOT
from llava_ndino.model.build import PAD_TOKEN

SYSTEM = "Sei un assistente che risponde in italiano."
Q1, A1 = "Cosa c'è nella foto?", " Un gatto che dorme sul divano. \n"
Q2, A2 = "Di che colore è?", "È grigio, con macchie bianche (forse 2 o 3)."
A_LONG = " ".join(["La città di Bari si trova in Puglia, sul mare Adriatico."] * 20)


def small_image(color=(200, 40, 40)) -> Image.Image:
    return Image.new("RGB", (16, 16), color)  # square: 1176 image tokens


def trained_texts(tokenizer, encoded) -> list[str]:
    """Decode every contiguous run of label-bearing tokens; labels must equal the input ids there."""
    mask = encoded.labels != IGNORE_INDEX
    assert torch.equal(encoded.labels[mask], encoded.input_ids[mask])
    runs, current = [], []
    for token, trained in zip(encoded.input_ids.tolist(), mask.tolist(), strict=True):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def llama3(processor) -> ConversationEncoder:
    return ConversationEncoder(processor, "llama3")


@pytest.fixture(scope="module")
def plain(processor) -> ConversationEncoder:
    return ConversationEncoder(processor, "plain")


def llava_sample(
    turns: list[tuple[str, str]], images: list[str] | None = None, sample_id: str = "s1"
) -> dict:
    sample = {"id": sample_id, "conversations": [{"from": r, "value": v} for r, v in turns]}
    if images is not None:
        sample["image"] = images
    return sample


# --- labels are exactly the answers -----------------------------------------------------------


def test_multi_turn_text_only_llama3(llama3, processor):
    sample = llava_sample([("human", Q1), ("gpt", A1), ("human", Q2), ("gpt", A2)])
    encoded = llama3.encode(sample)
    assert encoded.pixel_values is None and encoded.image_sizes is None
    assert trained_texts(processor.tokenizer, encoded) == [A1.strip() + EOT, A2.strip() + EOT]
    # everything else is the prompt: questions and headers carry no labels
    assert processor.tokenizer.decode(encoded.input_ids[encoded.labels == IGNORE_INDEX]).count(Q1) == 1


def test_multi_image_multi_turn_llama3(llama3, processor):
    sample = llava_sample(
        [("human", f"<image>\n{Q1}"), ("gpt", A1), ("human", f"E qui <image> {Q2}"), ("gpt", A2)],
        images=["a.png", "b.png"],
    )
    encoded = llama3.encode(sample, images=[small_image(), small_image((0, 0, 255))])
    assert encoded.pixel_values.shape[0] == 2
    assert trained_texts(processor.tokenizer, encoded) == [A1.strip() + EOT, A2.strip() + EOT]
    image_ids = encoded.input_ids == processor.image_token_id
    assert image_ids.sum() == 2 * 1176
    assert (encoded.labels[image_ids] == IGNORE_INDEX).all()


def test_system_turn_is_never_trained(llama3, processor):
    sample = llava_sample([("system", SYSTEM), ("human", Q1), ("gpt", A1)])
    encoded = llama3.encode(sample)
    assert trained_texts(processor.tokenizer, encoded) == [A1.strip() + EOT]
    assert SYSTEM in processor.tokenizer.decode(encoded.input_ids)


@pytest.mark.parametrize(("template", "stop"), [("llama3", EOT), ("plain", END_OF_TEXT)])
def test_openai_messages_with_list_content(processor, template, stop):
    encoder = ConversationEncoder(processor, template)
    sample = {
        "id": "oa",
        "images": ["x.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": A1}]},
            {"role": "user", "content": Q2},
            {"role": "assistant", "content": A2},
        ],
    }
    encoded = encoder.encode(sample, images=[small_image()])
    assert trained_texts(processor.tokenizer, encoded) == [A1.strip() + stop, A2.strip() + stop]


def test_plain_caption(plain, processor):
    sample = llava_sample([("human", "<image>\n"), ("gpt", A2)], images=["c.png"])
    encoded = plain.encode(sample, images=[small_image()])
    assert trained_texts(processor.tokenizer, encoded) == [A2.strip() + END_OF_TEXT]
    decoded = processor.tokenizer.decode(encoded.input_ids)
    assert decoded.startswith(BEGIN_OF_TEXT + "<image>")
    assert decoded.endswith("<image>\n" + A2.strip() + END_OF_TEXT)


def test_plain_text_only(plain, processor):
    encoded = plain.encode(llava_sample([("human", Q1), ("gpt", A1)]))
    assert trained_texts(processor.tokenizer, encoded) == [A1.strip() + END_OF_TEXT]


# --- pad token ---------------------------------------------------------------------------------


def test_pad_is_dedicated(processor, llama3):
    tok = processor.tokenizer
    stops = {tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(END_OF_TEXT)}
    pad = tok.pad_token_id
    assert pad is not None and pad != 0 and pad not in stops and pad != tok.bos_token_id
    assert tok.convert_ids_to_tokens(pad) == PAD_TOKEN
    short = llama3.encode(llava_sample([("human", Q1), ("gpt", "Sì.")], sample_id="a"))
    long = llama3.encode(llava_sample([("human", Q1), ("gpt", A2)], sample_id="b"))
    batch = collate([short, long], pad_token_id=pad)
    n = short.input_ids.numel()
    assert (batch["input_ids"][0, n:] == pad).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    # eos (<|eot_id|>) stays in the loss: it is never confused with padding
    eot = tok.convert_tokens_to_ids(EOT)
    assert (batch["labels"][0] == eot).sum() == 1


# --- truncation --------------------------------------------------------------------------------


def image_sample() -> dict:
    return llava_sample([("human", f"<image>\n{Q1}"), ("gpt", A1)], images=["a.png"], sample_id="trunc-img")


def test_truncation_inside_image_tokens_is_refused(processor):
    full = ConversationEncoder(processor, "llama3").encode(image_sample(), images=[small_image()])
    positions = (full.input_ids == processor.image_token_id).nonzero().flatten()
    first, last = int(positions.min()), int(positions.max())
    for max_length in (first, first + 1, last):
        encoder = ConversationEncoder(processor, "llama3", max_length=max_length)
        with pytest.raises(SampleError) as err:
            encoder.encode(image_sample(), images=[small_image()])
        assert err.value.reason == "truncated_image"
        assert "trunc-img" in str(err.value)
    # keeping every image token but no answer token is a different problem
    encoder = ConversationEncoder(processor, "llama3", max_length=last + 1)
    with pytest.raises(SampleError) as err:
        encoder.encode(image_sample(), images=[small_image()])
    assert err.value.reason == "no_target"


def test_truncation_after_image_keeps_image_and_labels(processor):
    full = ConversationEncoder(processor, "llama3").encode(image_sample(), images=[small_image()])
    max_length = full.input_ids.numel() - 3
    cut = ConversationEncoder(processor, "llama3", max_length=max_length).encode(
        image_sample(), images=[small_image()]
    )
    assert cut.input_ids.tolist() == full.input_ids[:max_length].tolist()
    assert cut.labels.tolist() == full.labels[:max_length].tolist()
    assert (cut.input_ids == processor.image_token_id).sum() == 1176


def test_long_text_answer_is_truncated_with_labels(processor):
    sample = llava_sample([("human", Q1), ("gpt", A_LONG)], sample_id="long")
    full = ConversationEncoder(processor, "llama3").encode(sample)
    max_length = 64
    assert full.input_ids.numel() > max_length
    cut = ConversationEncoder(processor, "llama3", max_length=max_length).encode(sample)
    assert cut.input_ids.numel() == cut.labels.numel() == max_length
    assert cut.input_ids.tolist() == full.input_ids[:max_length].tolist()
    (text,) = trained_texts(processor.tokenizer, cut)
    assert len(text) > 20 and A_LONG.startswith(text)


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "reason"),
    [
        (
            llava_sample([("human", "<image>\n<image>\nDue?"), ("gpt", "Sì")], ["a.png"], "bad-1"),
            "image_count_mismatch",
        ),
        (
            llava_sample([("human", "Nessuna immagine"), ("gpt", "Ok")], ["a.png"], "bad-2"),
            "image_count_mismatch",
        ),
        (llava_sample([("human", "<image>\nE?"), ("gpt", "Ok")], None, "bad-3"), "image_count_mismatch"),
        (llava_sample([("human", "Ciao"), ("human", "Ci sei?")], None, "bad-4"), "no_assistant"),
        (llava_sample([("human", "Ciao"), ("robot", "Bip")], None, "bad-5"), "unknown_role"),
        (
            {"id": "bad-6", "messages": [{"role": "user", "content": "A"}, {"role": "bot", "content": "B"}]},
            "unknown_role",
        ),
        (
            {
                "id": "bad-7",
                "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
            },
            "no_assistant",
        ),
    ],
    ids=[
        "two-placeholders-one-image",
        "image-without-placeholder",
        "placeholder-without-image",
        "no-assistant",
        "unknown-llava-role",
        "unknown-openai-role",
        "no-assistant-openai",
    ],
)
def test_bad_samples(llama3, sample, reason):
    with pytest.raises(SampleError) as err:
        llama3.encode(sample)
    assert err.value.reason == reason
    assert sample["id"] in str(err.value)


def test_missing_and_unreadable_image_files(processor, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    Image.new("RGB", (12, 10), (9, 9, 9)).save(tmp_path / "ok.png")
    encoder = ConversationEncoder(processor, "llama3", image_root=tmp_path)
    turns = [("human", "<image>\nCosa?"), ("gpt", "Niente.")]
    ok = encoder.encode(llava_sample(turns, ["ok.png"], "good"))
    assert ok.image_sizes.tolist() == [[10, 12]]
    for ref, reason in (("missing.png", "missing_image"), ("broken.jpg", "unreadable_image")):
        with pytest.raises(SampleError) as err:
            encoder.encode(llava_sample(turns, [ref], f"id-{reason}"))
        assert err.value.reason == reason
        assert f"id-{reason}" in str(err.value) and ref in str(err.value)
