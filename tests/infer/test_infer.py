"""Inference: single questions, streaming, left-padded batches, JSONL files and the ``ndino ask`` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ndino.cli import main
from llava_ndino.export.vlm import save_llava_folder
from llava_ndino.infer import Answerer, load_answerer
from llava_ndino.model.loading import load_trained

SIZES_WH = [(200, 100), (100, 300), (336, 336)]
QUESTIONS = ["Cosa c'è nell'immagine?", "Di che colore è il cerchio?", "Descrivi la scena."]
NEW_TOKENS = 8


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic random RGB image."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sharpen(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw the LM and projector matrices with a large std, so answers depend on image and question.

    With the default init (std 0.02) the tiny LM says the same thing whatever it sees, and a
    padding bug would go unnoticed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "vision_tower" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode ~50x faster on one thread than on several contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tiny_llava_dir: Path, tmp_path_factory) -> Path:
    """The tiny LlavaNext folder with sharpened weights."""
    model, processor = load_trained(tiny_llava_dir)
    sharpen(model)
    return save_llava_folder(model, processor, tmp_path_factory.mktemp("sharp") / "model")


@pytest.fixture(scope="module")
def answerer(model_dir: Path) -> Answerer:
    return load_answerer(model_dir)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES_WH)]


def test_prompt_is_llama3_with_generation_prompt(answerer: Answerer) -> None:
    assert answerer.prompt("Ciao?") == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nCiao?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    vocab = answerer.tokenizer.get_vocab()
    assert answerer.stop_ids == sorted({vocab["<|eot_id|>"], vocab["<|end_of_text|>"]})


def test_ask_returns_stripped_string(answerer: Answerer, images: list[Image.Image]) -> None:
    answer = answerer.ask(images[0], QUESTIONS[0], max_new_tokens=NEW_TOKENS)
    assert isinstance(answer, str) and answer
    assert answer == answer.strip()


def test_stream_concatenates_to_the_answer(answerer: Answerer, images: list[Image.Image]) -> None:
    expected = answerer.ask(images[1], QUESTIONS[1], max_new_tokens=NEW_TOKENS)
    pieces: list[str] = []
    streamed = answerer.ask(images[1], QUESTIONS[1], max_new_tokens=NEW_TOKENS, stream=pieces.append)
    assert streamed == expected
    assert len(pieces) > 1
    assert "".join(pieces).strip() == expected


def test_batch_equals_one_by_one(answerer: Answerer, images: list[Image.Image]) -> None:
    items = list(zip(images, QUESTIONS, strict=True))
    one_by_one = [answerer.ask(image, question, max_new_tokens=NEW_TOKENS) for image, question in items]
    assert len(set(one_by_one)) == len(items), (
        "the model must be input-sensitive for this test to mean anything"
    )
    assert answerer.ask_batch(items, max_new_tokens=NEW_TOKENS) == one_by_one
    assert answerer.tokenizer.padding_side == "right"  # restored after generation
    assert answerer.ask_batch([]) == []


def test_sampling(answerer: Answerer, images: list[Image.Image]) -> None:
    torch.manual_seed(0)
    first = answerer.ask(images[0], QUESTIONS[0], max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9)
    torch.manual_seed(0)
    again = answerer.ask(images[0], QUESTIONS[0], max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9)
    assert isinstance(first, str) and first == again
    with pytest.raises(ValueError, match="temperature"):
        answerer.ask(images[0], QUESTIONS[0], temperature=-1.0)


def write_images(folder: Path, images: list[Image.Image]) -> list[str]:
    names = []
    for i, image in enumerate(images):
        names.append(f"img{i}.png")
        image.save(folder / names[-1])
    return names


def test_jsonl_bad_image_gets_an_error_line(answerer: Answerer, images, tmp_path: Path) -> None:
    names = write_images(tmp_path, images)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    requests = [
        {"id": "a", "image": names[0], "question": QUESTIONS[0]},
        {"id": "missing", "image": "nowhere.png", "question": QUESTIONS[1]},
        {"id": "b", "image": names[1], "question": QUESTIONS[1]},
        {"id": "broken", "image": "broken.jpg", "question": QUESTIONS[0]},
        {"id": "c", "image": names[2], "question": QUESTIONS[2]},
    ]
    in_path = tmp_path / "in.jsonl"
    in_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests), encoding="utf-8")
    out_path = tmp_path / "out" / "answers.jsonl"
    counts = answerer.answer_jsonl(
        in_path, out_path, batch_size=2, image_root=tmp_path, max_new_tokens=NEW_TOKENS
    )
    assert counts == {"answered": 3, "errors": 2, "already_done": 0}
    lines = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == ["a", "missing", "b", "broken", "c"]
    assert set(lines[1]) == {"id", "error"} and "nowhere.png" in lines[1]["error"]
    assert set(lines[3]) == {"id", "error"} and "broken.jpg" in lines[3]["error"]
    expected = answerer.ask_batch(list(zip(images, QUESTIONS, strict=True)), max_new_tokens=NEW_TOKENS)
    for line, question, answer in zip((lines[0], lines[2], lines[4]), QUESTIONS, expected, strict=True):
        assert line == {"id": line["id"], "question": question, "answer": answer}


def test_jsonl_malformed_line_is_an_error_line_naming_the_line(answerer: Answerer, tmp_path: Path) -> None:
    in_path = tmp_path / "in.jsonl"
    in_path.write_text('{"id": 1, "image": "x.png", "question": "q"}\n{"id": 2, "image": "y.png"}\n')
    counts = answerer.answer_jsonl(in_path, tmp_path / "out.jsonl", image_root=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert counts["errors"] == 2 and [line["id"] for line in lines] == [1, 2]
    assert "x.png" in lines[0]["error"] and re.search(r"in\.jsonl:2: missing question", lines[1]["error"])


def test_cli_ask_prints_the_answer(answerer, images, model_dir: Path, tmp_path: Path, capsys) -> None:
    image_path = tmp_path / "foto.png"
    images[2].save(image_path)
    expected = answerer.ask(images[2], QUESTIONS[2], max_new_tokens=NEW_TOKENS)
    base = ["ask", "--model", str(model_dir), "--image", str(image_path), "--max-new-tokens", str(NEW_TOKENS)]
    main([*base, QUESTIONS[2]])
    assert capsys.readouterr().out.strip() == expected
    main([*base, "--stream", QUESTIONS[2]])
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.parametrize("name", ["missing.jpg", "corrupt.jpg"])
def test_cli_ask_bad_image_exits_2(model_dir: Path, tmp_path: Path, capsys, name: str) -> None:
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "--model", str(model_dir), "--image", str(tmp_path / name), "Cosa vedi?"])
    assert exit_info.value.code == 2
    assert name in capsys.readouterr().err


def test_cli_ask_batch(model_dir: Path, images, tmp_path: Path, capsys) -> None:
    names = write_images(tmp_path, images[:2])
    in_path = tmp_path / "in.jsonl"
    in_path.write_text("".join(json.dumps({"id": n, "image": n, "question": "Cosa?"}) + "\n" for n in names))
    out_path = tmp_path / "out.jsonl"
    main(
        ["ask", "--model", str(model_dir), "--batch", str(in_path), "--out", str(out_path)]
        + ["--image-root", str(tmp_path), "--max-new-tokens", "4"]
    )
    assert [json.loads(line)["id"] for line in out_path.read_text().splitlines()] == names
    assert "2 answered, 0 errors" in capsys.readouterr().out
