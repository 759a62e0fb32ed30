"""A shortened `make demo`: the tiny VLM must beat the strongest text-only guess by a clear margin,
and the exported folder must answer through `ndino ask`."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ndino.cli import main
from llava_ndino.config import load_config
from llava_ndino.demo.run import eval_samples, run_demo
from llava_ndino.demo.scoring import majority_baseline
from llava_ndino.synthetic.shapes import generate_samples

SHORT = ["train.max_steps=500", "data.synthetic.eval=120", "train.save_every=1000"]


@pytest.mark.slow
def test_short_demo_learns_from_the_image(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    scores = run_demo([f"output_dir={out}", *SHORT])
    cfg = load_config(["recipe=demo", f"output_dir={out}", *SHORT])

    held_out = eval_samples(cfg)
    train_like = generate_samples(2000, seed=cfg.seed, width=32, height=32)
    baseline = majority_baseline(train_like, held_out)
    printed = capsys.readouterr().out
    assert (
        printed.strip().splitlines()[-1]
        == f"demo accuracy: {scores['accuracy']:.2f} ({scores['total']} questions)"
    )
    assert scores["total"] == cfg.data.synthetic.eval
    assert scores["accuracy"] >= baseline + 0.2, (
        f"accuracy {scores['accuracy']:.2f}, text-only {baseline:.2f}"
    )

    assert (
        main(
            [
                "ask",
                "--model",
                str(out / "export"),
                "--image",
                str(out / "fresh_image.png"),
                "Quante forme ci sono?",
            ]
        )
        == 0
    )
    answer = capsys.readouterr().out.strip()
    assert answer in {"una", "due", "tre"}, answer
