"""Machine translation of LLaVA conversations into Italian (how every Italian NDiNO data set was made).

Only the text of the turns is translated: ``<image>`` placeholders, line breaks, turn order, roles,
ids and every other field are kept. Texts go to the backend line by line (MADLAD-400 and Argos
translate sentences, not documents) in batches. The output is JSONL, appended record by record, so
an interrupted run resumes by skipping the ids already written.

Backends: ``madlad`` (transformers seq2seq, each input prefixed with ``<2it>`` as MADLAD-400
expects; google/madlad400-3b-mt in bf16 on GPU for the real thing) and ``argos`` (Argos Translate,
when installed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from llava_ndino.data.dataset import read_records
from llava_ndino.formats.prompts import IMAGE_PLACEHOLDER

Translate = Callable[[list[str]], list[str]]
MADLAD_PREFIX = "<2it> "
_PIECES = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|\\n)")


class MadladTranslator:
    """MADLAD-400 (or any seq2seq model that takes a ``<2xx>`` target-language prefix) via transformers."""

    def __init__(
        self, model, tokenizer, max_new_tokens: int = 256, num_beams: int = 1, prefix: str = MADLAD_PREFIX
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.num_beams, self.prefix = max_new_tokens, num_beams, prefix

    @classmethod
    def from_pretrained(
        cls, folder: str, device: str = "cpu", dtype: str = "auto", **kwargs
    ) -> MadladTranslator:
        """Load a local MADLAD-400 folder (e.g. a download of google/madlad400-3b-mt)."""
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch_dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(folder), **kwargs)

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        inputs = self.tokenizer(
            [self.prefix + text for text in texts], return_tensors="pt", padding=True, truncation=True
        ).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class ArgosTranslator:
    """Argos Translate (offline; the en->it package must be installed)."""

    def __init__(self, source: str = "en", target: str = "it"):
        try:
            from argostranslate import translate
        except ImportError as err:
            raise RuntimeError(
                "the argos backend needs Argos Translate: pip install argostranslate, then install the "
                f"{source}->{target} package (argospm install translate-{source}_{target})"
            ) from err
        self._translate = translate.translate
        self.source, self.target = source, target

    def __call__(self, texts: list[str]) -> list[str]:
        return [self._translate(text, self.source, self.target) for text in texts]


def split_text(text: str) -> list[str]:
    """Split into translatable pieces and the separators kept verbatim (``<image>`` and line breaks)."""
    return [piece for piece in _PIECES.split(text) if piece != ""]


def _is_text(piece: str) -> bool:
    return piece not in (IMAGE_PLACEHOLDER, "\n") and bool(piece.strip())


def _turn_texts(record: dict) -> list[tuple[list, int, str]]:
    """(container, index, key) of every translatable turn string of a LLaVA or OpenAI-style record."""
    slots = []
    for i, turn in enumerate(record.get("conversations") or []):
        if isinstance(turn, dict) and isinstance(turn.get("value"), str):
            slots.append((record["conversations"], i, "value"))
    for i, turn in enumerate(record.get("messages") or []):
        if isinstance(turn, dict) and isinstance(turn.get("content"), str):
            slots.append((record["messages"], i, "content"))
    return slots


def translate_records(records: list[dict], translate: Translate) -> list[dict]:
    """Translated copies of ``records`` (one backend call for all their text pieces)."""
    records = json.loads(json.dumps(records))
    plan = []
    texts: list[str] = []
    for record in records:
        for container, index, key in _turn_texts(record):
            pieces = split_text(container[index][key])
            plan.append((container, index, key, pieces))
            for piece in pieces:
                if _is_text(piece):
                    texts.append(piece.strip())
    translated = iter(translate(texts) if texts else [])
    for container, index, key, pieces in plan:
        out = []
        for piece in pieces:
            if _is_text(piece):
                lead = piece[: len(piece) - len(piece.lstrip())]
                trail = piece[len(piece.rstrip()) :]
                out.append(lead + next(translated) + trail)
            else:
                out.append(piece)
        container[index][key] = "".join(out)
    return records


def _done_ids(path: Path) -> set[str]:
    """Ids already in ``path``; a line cut by an interruption is removed so that it is translated again."""
    if not path.is_file():
        return set()
    kept, done = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            done.add(str(json.loads(line)["id"]))
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return done


def _batches(records: list[dict], size: int) -> Iterator[list[dict]]:
    for begin in range(0, len(records), size):
        yield records[begin : begin + size]


def translate_file(src: Path, out: Path, translate: Translate, batch_size: int = 16) -> dict[str, int]:
    """Translate every record of ``src`` (LLaVA JSON/JSONL) into ``out`` (JSONL), skipping ids already there.

    Records need an ``id`` (it is how a resumed run knows what is done); returns counts.
    """
    records = read_records(src)
    missing = [i for i, r in enumerate(records) if not isinstance(r, dict) or "id" not in r]
    if missing:
        raise ValueError(f"{src}: records {missing[:5]} have no 'id'; translation resumes by id, so add ids")
    done = _done_ids(out)
    todo = [r for r in records if str(r["id"]) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        out.open("a", encoding="utf-8") as handle,
        tqdm(total=len(todo), desc="translate", unit="sample") as bar,
    ):
        for batch in _batches(todo, batch_size):
            for record in translate_records(batch, translate):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            bar.update(len(batch))
    return {"translated": len(todo), "skipped_done": len(records) - len(todo)}
