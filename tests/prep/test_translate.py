"""Translation to Italian: structure (<image>, line breaks, turns, ids) is kept, MADLAD gets its <2it>
prefix, and an interrupted run resumes by id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import T5Config, T5ForConditionalGeneration

from llava_ndino.cli import main
from llava_ndino.model.tokenizer import train_tiny_tokenizer
from llava_ndino.prep.translate import MadladTranslator, split_text, translate_file, translate_records

RECORDS = [
    {
        "id": "a",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A cat.\n\nIt sleeps on a red sofa."},
            {"from": "human", "value": "And the colour?  "},
            {"from": "gpt", "value": "Red."},
        ],
    },
    {
        "id": "b",
        "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}],
    },
    {
        "id": "c",
        "images": ["x.png", "y.png"],
        "conversations": [
            {"from": "human", "value": "Compare <image> with\n<image>"},
            {"from": "gpt", "value": "Same."},
        ],
    },
]


class FakeBackend:
    """Marks each text as translated and counts what it was asked."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list[str]) -> list[str]:
        self.seen += texts
        return [f"IT[{t}]" for t in texts]


def _skeleton(text: str) -> list[str]:
    return [p if p in ("<image>", "\n") else "TEXT" for p in split_text(text) if p.strip() or p == "\n"]


def test_structure_ids_and_placeholders_are_kept() -> None:
    backend = FakeBackend()
    out = translate_records(RECORDS, backend)
    assert out[0]["conversations"][1]["value"] == "IT[A cat.]\n\nIT[It sleeps on a red sofa.]"
    assert out[0]["conversations"][2]["value"] == "IT[And the colour?]  "
    assert out[2]["conversations"][0]["value"] == "IT[Compare] <image> IT[with]\n<image>"
    assert out[1]["messages"][1] == {"role": "assistant", "content": "IT[Hi there]"}
    for before, after in zip(RECORDS, out, strict=True):
        assert {k: v for k, v in before.items() if k not in ("conversations", "messages")} == {
            k: v for k, v in after.items() if k not in ("conversations", "messages")
        }
        turns = before.get("conversations") or before["messages"]
        translated = after.get("conversations") or after["messages"]
        key = "value" if "conversations" in before else "content"
        assert [t.get("from", t.get("role")) for t in turns] == [
            t.get("from", t.get("role")) for t in translated
        ]
        assert [_skeleton(t[key]) for t in turns] == [_skeleton(t[key]) for t in translated]
    assert RECORDS[0]["conversations"][1]["value"].startswith("A cat"), "input records are not modified"


def test_resume_skips_done_ids_and_drops_a_cut_line(tmp_path: Path) -> None:
    src, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    src.write_text(json.dumps(RECORDS))
    translate_file(src, out, FakeBackend(), batch_size=1)
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:20])  # killed while writing the second record
    backend = FakeBackend()
    counts = translate_file(src, out, backend, batch_size=2)
    assert counts == {"translated": 2, "skipped_done": 1}
    assert not any("cat" in text for text in backend.seen), "record a was not translated again"
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    tokenizer = train_tiny_tokenizer(vocab_size=300)
    tokenizer.pad_token = tokenizer.pad_token or "<|end_of_text|>"
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=1,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("t5")
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_madlad_backend_prefixes_2it_and_cli_runs_on_a_tiny_t5(tiny_t5: Path, tmp_path: Path) -> None:
    translator = MadladTranslator.from_pretrained(str(tiny_t5), max_new_tokens=4)
    asked = []
    tokenizer = translator.tokenizer

    def spy(texts, **kwargs):
        asked.extend(texts)
        return tokenizer(texts, **kwargs)

    translator.tokenizer = type(
        "Spy", (), {"__call__": staticmethod(spy), "batch_decode": tokenizer.batch_decode}
    )()
    assert len(translator(["Hello", "A red sofa"])) == 2
    assert asked == ["<2it> Hello", "<2it> A red sofa"]

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS))
    args = ["data", "translate", str(src), str(out), "--model", str(tiny_t5), "--max-new-tokens", "4"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["conversations"][0]["value"].count("<image>") == 2
    assert rows[0]["conversations"][0]["value"].startswith("<image>\n")
