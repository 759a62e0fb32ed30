"""Small synthetic Italian data sets in every text format, for tests, smoke runs and the README.

Sentences follow a fixed grammar (subject, verb, object, place, time), so a tiny model learns them
in minutes on CPU and held-out perplexity shows it; the same seed always gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "il gatto", "la ragazza", "il professore", "mia nonna", "il cane", "lo studente", "la maestra",
    "il pescatore", "la dottoressa", "il cuoco", "mio fratello", "la sindaca",
]  # fmt: skip
VERBS = ["mangia", "guarda", "cerca", "prepara", "legge", "porta", "compra", "disegna", "trova", "vende"]
OBJECTS = [
    "una mela", "il giornale", "la pizza", "un libro", "una lettera", "il pane", "una mappa",
    "la torta", "un quadro", "il caffè",
]  # fmt: skip
PLACES = ["a Roma", "a Bari", "in montagna", "al mare", "a casa", "in biblioteca", "in piazza", "a Napoli"]
TIMES = ["ogni mattina", "di sera", "la domenica", "spesso", "oggi", "d'estate"]


def sentence(rng: random.Random, subject: str | None = None) -> str:
    """One grammatical sentence, about ``subject`` when given."""
    parts = [subject or rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    parts += [rng.choice(PLACES), rng.choice(TIMES)]
    text = " ".join(parts)
    return text[0].upper() + text[1:] + "."


def documents(count: int, seed: int) -> list[str]:
    """``count`` documents of 3 to 6 sentences each."""
    rng = random.Random(seed)
    return [" ".join(sentence(rng) for _ in range(rng.randint(3, 6))) for _ in range(count)]


def _scrambled(rng: random.Random, text: str) -> str:
    words = text.rstrip(".").split()
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text_samples(out_dir: Path, seed: int = 0, count: int = 200) -> dict[str, Path]:
    """Write ``text.jsonl`` and ``heldout.jsonl`` (clm), ``instructions.jsonl`` and ``chat.jsonl`` (sft)
    and ``preferences.jsonl`` (dpo: the chosen answer is grammatical, the rejected one scrambled)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    instructions, chats, preferences = [], [], []
    for index in range(count):
        subject = rng.choice(SUBJECTS)
        answer = sentence(rng, subject)
        words = answer.split()
        instructions.append(
            {
                "instruction": "Completa la frase." if index % 2 else f"Scrivi una frase su {subject}.",
                "input": " ".join(words[:3]) if index % 2 else "",
                "output": answer,
            }
        )
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": f"Che cosa fa {subject}?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
        prompt = f"Scrivi una frase su {subject}."
        rejected = _scrambled(rng, answer)
        if index % 2:  # orpo-dpo-mix-40k style: whole conversations
            user = {"role": "user", "content": prompt}
            preferences.append(
                {
                    "prompt": prompt,
                    "chosen": [user, {"role": "assistant", "content": answer}],
                    "rejected": [user, {"role": "assistant", "content": rejected}],
                }
            )
        else:
            preferences.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
    return {
        "text": _write(out_dir / "text.jsonl", [{"text": d} for d in documents(count, seed)]),
        "heldout": _write(out_dir / "heldout.jsonl", [{"text": d} for d in documents(count // 5, seed + 1)]),
        "instructions": _write(out_dir / "instructions.jsonl", instructions),
        "chat": _write(out_dir / "chat.jsonl", chats),
        "preferences": _write(out_dir / "preferences.jsonl", preferences),
    }
