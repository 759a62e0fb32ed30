"""``make demo``: train a tiny VLM from scratch on CPU, evaluate it, export it and ask it a question.

Everything is generated locally (model, tokenizer, synthetic Italian shapes data); nothing is
downloaded. The last line printed is ``demo accuracy: 0.NN (N questions)``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from llava_ndino.config import RunConfig, load_config
from llava_ndino.demo.scoring import majority_baseline, score_exact_match
from llava_ndino.export.vlm import save_llava_folder
from llava_ndino.formats.run_dir import EXPORT_DIR
from llava_ndino.infer import Answerer
from llava_ndino.model.loading import load_trained
from llava_ndino.synthetic.shapes import QUESTION_TYPES, ShapesSample, make_sample
from llava_ndino.train.data_factory import record_source
from llava_ndino.train.loop import train


def eval_samples(cfg: RunConfig) -> list[ShapesSample]:
    """The held-out questions: the eval split of the synthetic set (a seed disjoint from training)."""
    source = record_source(cfg, "eval")
    return [make_sample(i, source.seed, source.image_size, source.image_size) for i in range(len(source))]


def evaluate(answerer: Answerer, samples: list[ShapesSample], batch_size: int = 32) -> dict:
    """Greedy answers for ``samples``, scored by exact match overall and per question type."""
    predictions = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        predictions += answerer.ask_batch([(s.image, s.question) for s in chunk], max_new_tokens=16)
    return score_exact_match(predictions, samples)


def format_report(scores: dict, baseline: float) -> str:
    """Per-type accuracy lines, the text-only baseline, and the closing ``demo accuracy`` line."""
    lines = [f"{'type':<12} {'accuracy':>8} {'n':>5}"]
    for qtype in QUESTION_TYPES:
        row = scores["per_type"].get(qtype)
        if row:
            lines.append(f"{qtype:<12} {row['accuracy']:>8.2f} {row['total']:>5}")
    lines.append(f"text-only majority baseline: {baseline:.2f}")
    lines.append(f"demo accuracy: {scores['accuracy']:.2f} ({scores['total']} questions)")
    return "\n".join(lines)


def run_demo(overrides: list[str], train_first: bool = True) -> dict:
    """Train (or resume) ``recipe=demo`` with ``overrides``, evaluate, export, and answer a fresh image.

    ``train_first=False`` uses the latest checkpoint already in ``output_dir`` (trained by any engine).
    """
    cfg = load_config(["recipe=demo", *overrides])
    if train_first:
        result = train(cfg)
        if result.status != "completed":
            raise SystemExit(f"training stopped at step {result.step} ({result.status}); rerun to resume")
    # the demo owns its run's export folder, also one written before exports carried a marker
    export_dir = save_llava_folder(
        *load_trained(Path(cfg.output_dir)), Path(cfg.output_dir) / EXPORT_DIR, force=True
    )
    print(f"exported HF LlavaNext folder: {export_dir}")
    answerer = Answerer.from_path(export_dir)

    fresh = make_sample(
        0, secrets.randbelow(10**9) + 10**9, cfg.data.synthetic.image_size, cfg.data.synthetic.image_size
    )
    image_path = Path(cfg.output_dir) / "fresh_image.png"
    fresh.image.save(image_path)
    answer = answerer.ask(fresh.image, fresh.question)
    print(
        f'\nndino ask --model {export_dir} --image {image_path} "{fresh.question}"\n{answer}  (expected: {fresh.answer})\n'
    )

    samples = eval_samples(cfg)
    train_source = record_source(cfg, "train")
    baseline_train = [make_sample(i, train_source.seed, 32, 32) for i in range(min(len(train_source), 2000))]
    scores = evaluate(answerer, samples)
    print(format_report(scores, majority_baseline(baseline_train, samples)))
    return scores
