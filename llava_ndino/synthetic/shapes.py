"""Synthetic Italian visual-QA data set of coloured shapes, used by ``make demo``.

Each image has a white background divided into a 2x2 grid of equal cells (rectangular when the
image is not square). One or two filled shapes are drawn (:data:`MAX_SHAPES`), each alone in its own cell, so shapes
never overlap and their position always has a single name:

    in alto a sinistra  | in alto a destra
    in basso a sinistra | in basso a destra

Shapes are ``cerchio``, ``quadrato`` and ``triangolo``; within a scene their colours are distinct
and drawn from four saturated colours (``rosso``, ``verde``, ``blu``, ``giallo``) that survive
resizing. Each shape's size (70-90% of the cell) and offset inside its cell are jittered, so two
seeds rarely produce the same image. Drawing uses no anti-aliasing: every shape pixel has exactly
its named colour.

Each sample carries one question of one of four types, chosen round-robin so the mix is exactly
balanced, with a short lowercase answer meant for exact match:

* ``colore``: "Di che colore è il cerchio?" -> "rosso" (only for a kind present exactly once);
* ``conteggio``: "Quante forme ci sono?" -> "una" / "due";
* ``posizione``: "Dove si trova il quadrato?" -> "in alto a sinistra" (kind present exactly once);
* ``forma``: "Quale forma è rossa?" -> "il cerchio" (colour present exactly once).

Training uses multi-turn dialogues (:func:`make_dialogue`): one image and, in random order, the
count question, one ``colore`` question, every ``posizione`` and ``forma`` question the scene
supports, and a description ("Descrivi l'immagine." -> "un quadrato blu in basso a destra, un
cerchio rosso in alto a sinistra"). Like LLaVA's caption stage, the dense description teaches a
model trained from scratch to read every shape's kind, colour and place, which the questions then
reuse. Three choices make the two-shape look-up by kind learnable in the demo's CPU budget
(``docs/benchmarks.md#cpu-demo-make-demo``):

* :data:`TRAIN_TWO_SHAPE_SHARE` of training scenes hold two shapes, where the look-up is needed;
  one-shape scenes are answered by attending to the only shape.
* The description names the shapes in random order, not reading order. After "un cerchio" the
  model must find the circle's colour and place by its kind; in reading order it learns to report
  the first shape instead, and answers "Dove si trova il cerchio?" with the first shape's place.
* Every position and shape question is asked: they are the look-ups that stay hardest (a place
  takes four answer tokens), while one colour question per scene is enough.

Evaluation asks single questions of the four types, on scenes of 1 or 2 shapes drawn evenly.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from llava_ndino.data.dataset import RecordSource

QUESTION_TYPES: tuple[str, ...] = ("colore", "conteggio", "posizione", "forma")
KINDS: tuple[str, ...] = ("cerchio", "quadrato", "triangolo")
COLOURS: dict[str, tuple[int, int, int]] = {
    "rosso": (220, 20, 20),
    "verde": (20, 160, 40),
    "blu": (20, 50, 220),
    "giallo": (245, 200, 0),
}
FEMININE: dict[str, str] = {"rosso": "rossa", "verde": "verde", "blu": "blu", "giallo": "gialla"}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
GRID = 2
POSITION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "in alto a sinistra",
    (0, 1): "in alto a destra",
    (1, 0): "in basso a sinistra",
    (1, 1): "in basso a destra",
}
COUNT_WORDS: dict[int, str] = {1: "una", 2: "due", 3: "tre"}
MAX_SHAPES = 2
"""Generated scenes hold 1 or 2 shapes: enough to need binding (which shape is red?) while a tiny
model trained from scratch still learns it on a CPU in minutes. Hand-built scenes may hold 3."""
TRAIN_TWO_SHAPE_SHARE = 0.8
"""Share of training dialogues whose scene holds two shapes (evaluation scenes hold 1 or 2 evenly)."""
MIN_SIDE = 24
_SIZE_RANGE = (0.7, 0.9)
_MAX_JITTER = 0.5


@dataclass(frozen=True)
class Shape:
    """A filled shape in one grid cell.

    ``cell`` is ``(row, col)`` in the 2x2 grid; ``size`` is the shape's extent as a fraction of the
    cell's shorter side; ``dx``/``dy`` in [-1, 1] shift it inside the cell as a fraction of the
    free room on each axis (0 = centred, +-1 = touching the cell border).
    """

    kind: str
    colour: str
    cell: tuple[int, int]
    size: float = 0.75
    dx: float = 0.0
    dy: float = 0.0


@dataclass
class ShapesSample:
    """One visual-QA example; ``shapes`` is the scene the image was rendered from."""

    id: str
    image: Image.Image
    question: str
    answer: str
    qtype: str
    shapes: tuple[Shape, ...] = ()


def shape_bbox(shape: Shape, width: int, height: int) -> tuple[int, int, int, int]:
    """Return the inclusive pixel box ``(x0, y0, x1, y1)`` of ``shape`` in a ``width`` x ``height`` image."""
    if shape.kind not in KINDS or shape.colour not in COLOURS or shape.cell not in POSITION_NAMES:
        raise ValueError(f"invalid shape {shape}")
    if not (0.0 < shape.size <= 1.0 and abs(shape.dx) <= 1.0 and abs(shape.dy) <= 1.0):
        raise ValueError(f"shape geometry out of range: {shape}")
    cell_w, cell_h = width / GRID, height / GRID
    half = shape.size * min(cell_w, cell_h) / 2
    row, col = shape.cell
    cx = (col + 0.5) * cell_w + shape.dx * (cell_w / 2 - half)
    cy = (row + 0.5) * cell_h + shape.dy * (cell_h / 2 - half)
    return int(cx - half), int(cy - half), int(cx + half) - 1, int(cy + half) - 1


def shape_centre(shape: Shape, width: int, height: int) -> tuple[int, int]:
    """Return a pixel that lies inside ``shape`` for every kind (the centre of its box)."""
    x0, y0, x1, y1 = shape_bbox(shape, width, height)
    return (x0 + x1) // 2, (y0 + y1) // 2


def render_scene(shapes: Sequence[Shape], width: int = 224, height: int = 224) -> Image.Image:
    """Draw ``shapes`` (at most one per cell) on a white RGB image of the given size."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"image must be at least {MIN_SIDE}x{MIN_SIDE}, got {width}x{height}")
    cells = [shape.cell for shape in shapes]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two shapes share a cell: {cells}")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        x0, y0, x1, y1 = shape_bbox(shape, width, height)
        fill = COLOURS[shape.colour]
        if shape.kind == "cerchio":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "quadrato":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def questions_for_scene(shapes: Sequence[Shape]) -> list[tuple[str, str, str]]:
    """List every unambiguous ``(qtype, question, answer)`` the scene supports, in a fixed order."""
    if not 1 <= len(shapes) <= len(COUNT_WORDS):
        raise ValueError(f"a scene has 1-{len(COUNT_WORDS)} shapes, got {len(shapes)}")
    kind_counts = Counter(shape.kind for shape in shapes)
    colour_counts = Counter(shape.colour for shape in shapes)
    questions = [("conteggio", "Quante forme ci sono?", COUNT_WORDS[len(shapes)])]
    for shape in shapes:
        if kind_counts[shape.kind] == 1:
            questions.append(("colore", f"Di che colore è il {shape.kind}?", shape.colour))
            questions.append(("posizione", f"Dove si trova il {shape.kind}?", POSITION_NAMES[shape.cell]))
        if colour_counts[shape.colour] == 1:
            questions.append(("forma", f"Quale forma è {FEMININE[shape.colour]}?", f"il {shape.kind}"))
    return questions


def describe_scene(shapes: Sequence[Shape]) -> str:
    """Describe every shape in the given order: "un cerchio rosso in alto a sinistra, un ..."."""
    return ", ".join(f"un {shape.kind} {shape.colour} {POSITION_NAMES[shape.cell]}" for shape in shapes)


def random_scene(rng: random.Random, n: int | None = None) -> list[Shape]:
    """Draw a scene of ``n`` shapes (default: 1-MAX_SHAPES, uniformly) in distinct cells, listed in
    random cell order, with distinct colours and jittered geometry."""
    if n is None:
        n = rng.randint(1, MAX_SHAPES)
    if not 1 <= n <= MAX_SHAPES:
        raise ValueError(f"a random scene holds 1-{MAX_SHAPES} shapes, got {n}")
    cells = rng.sample(sorted(POSITION_NAMES), n)
    colours = rng.sample(sorted(COLOURS), n)
    return [
        Shape(
            kind=rng.choice(KINDS),
            colour=colour,
            cell=cell,
            size=rng.uniform(*_SIZE_RANGE),
            dx=rng.uniform(-_MAX_JITTER, _MAX_JITTER),
            dy=rng.uniform(-_MAX_JITTER, _MAX_JITTER),
        )
        for cell, colour in zip(cells, colours, strict=True)
    ]


def make_sample(i: int, seed: int, width: int = 224, height: int = 224) -> ShapesSample:
    """Return sample ``i`` of the stream for ``seed``; it depends only on ``(seed, i)``.

    Question types cycle through :data:`QUESTION_TYPES`; for each, scenes are redrawn until one
    supports that type, then one of its questions of that type is picked uniformly.
    """
    rng = random.Random(f"shapes:{seed}:{i}")
    qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
    while True:
        scene = random_scene(rng)
        candidates = [q for q in questions_for_scene(scene) if q[0] == qtype]
        if candidates:
            break
    _, question, answer = rng.choice(candidates)
    return ShapesSample(
        id=f"shapes-{seed}-{i:06d}",
        image=render_scene(scene, width, height),
        question=question,
        answer=answer,
        qtype=qtype,
        shapes=tuple(scene),
    )


def make_dialogue(i: int, seed: int, width: int = 224, height: int = 224) -> tuple[dict, Image.Image]:
    """Return training dialogue ``i`` for ``seed``: a LLaVA record and its image.

    The scene holds two shapes with probability :data:`TRAIN_TWO_SHAPE_SHARE`. The conversation
    asks, in random order, the count, one ``colore`` question (when the scene supports one), every
    supported ``posizione`` and ``forma`` question, and the description, which lists the
    shapes in the scene's random order (see the module docstring for why).
    """
    rng = random.Random(f"dialogue:{seed}:{i}")
    scene = random_scene(rng, 2 if rng.random() < TRAIN_TWO_SHAPE_SHARE else 1)
    by_type: dict[str, list[tuple[str, str]]] = {}
    for qtype, question, answer in questions_for_scene(scene):
        by_type.setdefault(qtype, []).append((question, answer))
    every = [*by_type.pop("posizione", []), *by_type.pop("forma", [])]
    turns = [rng.choice(options) for options in by_type.values()] + every
    turns.append(("Descrivi l'immagine.", describe_scene(scene)))
    rng.shuffle(turns)
    conversations = []
    for index, (question, answer) in enumerate(turns):
        prefix = "<image>\n" if index == 0 else ""
        conversations += [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]
    sample_id = f"shapes-dialogue-{seed}-{i:06d}"
    record = {"id": sample_id, "image": f"{sample_id}.png", "conversations": conversations}
    return record, render_scene(scene, width, height)


def iter_samples(n: int, seed: int, width: int = 224, height: int = 224) -> Iterator[ShapesSample]:
    """Yield samples ``0 .. n-1`` of the stream for ``seed`` (see :func:`make_sample`)."""
    for i in range(n):
        yield make_sample(i, seed, width, height)


def generate_samples(n: int, seed: int, width: int = 224, height: int = 224) -> list[ShapesSample]:
    """Return ``list(iter_samples(n, seed, width, height))``."""
    return list(iter_samples(n, seed, width, height))


def to_llava_record(sample: ShapesSample, image_rel_path: str) -> dict:
    """Convert ``sample`` to a LLaVA conversation record whose image lives at ``image_rel_path``."""
    return {
        "id": sample.id,
        "image": image_rel_path,
        "conversations": [
            {"from": "human", "value": "<image>\n" + sample.question},
            {"from": "gpt", "value": sample.answer},
        ],
    }


def write_shapes_dataset(out_dir: Path, n: int, seed: int, width: int = 224, height: int = 224) -> Path:
    """Write PNGs to ``out_dir/images/``, ``out_dir/data.json`` and ``out_dir/answers.jsonl``.

    ``data.json`` is a JSON list of LLaVA records (image paths relative to ``out_dir``);
    ``answers.jsonl`` holds ``id``, ``question``, ``answer`` and ``qtype`` per line. Returns the
    path of ``data.json``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    with open(out_dir / "answers.jsonl", "w", encoding="utf-8") as answers:
        samples = iter_samples(n, seed, width, height)
        for sample in tqdm(samples, total=n, desc="shapes", disable=n < 1000):
            rel_path = f"images/{sample.id}.png"
            sample.image.save(out_dir / rel_path)
            records.append(to_llava_record(sample, rel_path))
            row = {
                "id": sample.id,
                "question": sample.question,
                "answer": sample.answer,
                "qtype": sample.qtype,
            }
            answers.write(json.dumps(row, ensure_ascii=False) + "\n")
    json_path = out_dir / "data.json"
    json_path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return json_path


class ShapesRecords(RecordSource):
    """The synthetic Italian shapes set, generated on the fly from (seed, index): single questions, or
    multi-turn dialogues (the training form)."""

    def __init__(self, count: int, seed: int, image_size: int, dialogues: bool = False):
        self.count, self.seed, self.image_size, self.dialogues = count, seed, image_size, dialogues

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> tuple[dict, list[Image.Image]]:
        if self.dialogues:
            record, image = make_dialogue(index, self.seed, self.image_size, self.image_size)
            return record, [image]
        sample = make_sample(index, self.seed, self.image_size, self.image_size)
        return to_llava_record(sample, f"{sample.id}.png"), [sample.image]
