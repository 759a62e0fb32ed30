"""Demo scoring (``demo.scoring``): answer normalisation and exact-match accuracy, overall and per
question type."""

from __future__ import annotations

import pytest
from PIL import Image

from llava_ndino.demo.scoring import normalize_answer, score_exact_match
from llava_ndino.synthetic.shapes import ShapesSample


def test_normalize_answer():
    assert normalize_answer("  Rosso. ") == "rosso"
    assert normalize_answer("In  alto\ta SINISTRA!") == "in alto a sinistra"
    assert normalize_answer("il cerchio ?") == "il cerchio"
    assert normalize_answer("due") == "due"


def test_score_exact_match():
    samples = [
        ShapesSample(str(i), Image.new("RGB", (1, 1)), "q", answer, qtype)
        for i, (answer, qtype) in enumerate([("rosso", "colore"), ("due", "conteggio"), ("blu", "colore")])
    ]
    result = score_exact_match(["Rosso.", "tre", "blu"], samples)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert (result["correct"], result["total"]) == (2, 3)
    assert result["per_type"] == {
        "colore": {"accuracy": 1.0, "correct": 2, "total": 2},
        "conteggio": {"accuracy": 0.0, "correct": 0, "total": 1},
    }
    with pytest.raises(ValueError):
        score_exact_match(["rosso"], samples)
