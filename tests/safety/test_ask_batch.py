"""`ndino ask --batch` on hostile input: bad lines are error lines and the rest is answered, a huge
question is refused, the output is never truncated by a failed run and a rerun resumes, and a folder
that is not a LlavaNext model is refused before anything is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava_ndino.cli import main
from llava_ndino.infer import Answerer


@pytest.fixture(scope="module")
def answerer(tiny_llava_dir: Path) -> Answerer:
    return Answerer.from_path(tiny_llava_dir)


def _requests(folder: Path) -> Path:
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    lines = [
        json.dumps({"id": "ok", "image": "red.png", "question": "Di che colore è?"}),
        json.dumps({"id": "null-question", "image": "red.png", "question": None}),
        json.dumps({"id": "number-image", "image": 12345, "question": "Cosa vedi?"}),
        json.dumps({"id": {"nested": 1}, "image": "red.png", "question": "Cosa?"}),
        "[1, 2, 3]",
        "{not json",
        json.dumps({"id": "huge", "image": "red.png", "question": "parola " * 20_000}),
        json.dumps({"id": "escape", "image": "../../etc/hostname", "question": "Cosa?"}),
        json.dumps({"id": "ok2", "image": "red.png", "question": "Quante forme?"}),
    ]
    path = folder / "in.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_bad_line_is_an_error_line_and_the_rest_is_answered(answerer: Answerer, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    counts = answerer.answer_jsonl(
        _requests(tmp_path), out, image_root=tmp_path, max_prompt_tokens=512, max_new_tokens=2
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 9 and counts == {"answered": 2, "errors": 7, "already_done": 0}
    answered = [row["id"] for row in rows if "answer" in row]
    assert answered == ["ok", "ok2"]
    errors = {str(row["id"]): row["error"] for row in rows if "error" in row}
    assert "question must be text" in errors["null-question"]
    assert "image must be text" in errors["number-image"]
    assert "above --max-prompt-tokens 512" in errors["huge"]
    assert "outside the image root" in errors["escape"]


def test_a_failed_batch_keeps_the_old_output_and_a_rerun_resumes(
    answerer: Answerer, tmp_path: Path, monkeypatch
) -> None:
    requests, out = _requests(tmp_path), tmp_path / "out.jsonl"
    out.write_text('{"id": "ok", "question": "Di che colore è?", "answer": "rosso"}\n')
    original, calls = Answerer.ask_batch, []

    def failing(self, items, **generation):
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return original(self, items, **generation)

    monkeypatch.setattr(Answerer, "ask_batch", failing)
    with pytest.raises(RuntimeError, match="node lost"):
        answerer.answer_jsonl(requests, out, batch_size=3, image_root=tmp_path, max_new_tokens=2)
    assert out.read_text() == '{"id": "ok", "question": "Di che colore è?", "answer": "rosso"}\n'
    monkeypatch.setattr(Answerer, "ask_batch", original)
    counts = answerer.answer_jsonl(requests, out, batch_size=3, image_root=tmp_path, max_new_tokens=2)
    assert counts["already_done"] == 1  # "ok" was answered before the first run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows if "answer" in row] == ["ok", "ok2"]
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_a_huge_single_question_exits_2(tiny_llava_dir: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    args = [
        "ask",
        "--model",
        str(tiny_llava_dir),
        "--image",
        str(tmp_path / "red.png"),
        "--max-prompt-tokens",
        "64",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "parola " * 1000])
    assert exit_info.value.code == 2 and "above --max-prompt-tokens 64" in capsys.readouterr().err


def test_a_plain_language_model_folder_is_refused_before_building(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """`--model` pointing at a LLaMA folder used to build a default full-size LlavaNext (OOM)."""
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    code = main(["ask", "--model", str(tiny_dirs["llm"]), "--image", str(tmp_path / "red.png"), "Cosa?"])
    assert code == 2 and "holds a 'llama' model, not a LlavaNext one" in capsys.readouterr().err
