"""Scoring of the demo: exact match per question type against the majority-answer baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from llava_ndino.synthetic.shapes import QUESTION_TYPES, ShapesSample


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace and drop trailing punctuation, for exact-match scoring."""
    return " ".join(text.lower().split()).rstrip(" .,;:!?")


def score_exact_match(predictions: Sequence[str], samples: Sequence[ShapesSample]) -> dict:
    """Score normalised exact match of ``predictions`` against ``samples``.

    Returns ``{"accuracy", "correct", "total", "per_type": {qtype: {"accuracy", "correct",
    "total"}}}``, with ``per_type`` listing only the types present.
    """
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for prediction, sample in zip(predictions, samples, strict=True):
        total[sample.qtype] += 1
        correct[sample.qtype] += normalize_answer(prediction) == normalize_answer(sample.answer)
    per_type = {
        qtype: {"accuracy": correct[qtype] / total[qtype], "correct": correct[qtype], "total": total[qtype]}
        for qtype in QUESTION_TYPES
        if total[qtype]
    }
    n_correct, n_total = sum(correct.values()), len(samples)
    return {
        "accuracy": n_correct / n_total if n_total else 0.0,
        "correct": n_correct,
        "total": n_total,
        "per_type": per_type,
    }


def majority_baseline(train: Sequence[ShapesSample], eval: Sequence[ShapesSample]) -> float:
    """Accuracy on ``eval`` of a text-only guesser: the most frequent training answer to the exact
    question string, falling back to the most frequent answer of the question type, then overall."""
    by_question: dict[str, Counter[str]] = {}
    by_type: dict[str, Counter[str]] = {}
    for sample in train:
        by_question.setdefault(sample.question, Counter())[sample.answer] += 1
        by_type.setdefault(sample.qtype, Counter())[sample.answer] += 1
    overall = Counter(sample.answer for sample in train)
    predictions = []
    for sample in eval:
        counts = by_question.get(sample.question) or by_type.get(sample.qtype) or overall
        predictions.append(counts.most_common(1)[0][0] if counts else "")
    return score_exact_match(predictions, eval)["accuracy"]
