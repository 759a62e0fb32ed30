"""The synthetic Italian shapes visual-QA data set (``synthetic.shapes``): determinism, scenes drawn
where they are named, unambiguous and balanced questions, a text-only baseline well below the demo's
target, LLaVA records and dialogues."""

import json
from collections import Counter
from itertools import combinations

import pytest
from PIL import Image

from llava_ndino.demo.scoring import majority_baseline, normalize_answer
from llava_ndino.synthetic.shapes import (
    BACKGROUND,
    COLOURS,
    FEMININE,
    GRID,
    POSITION_NAMES,
    QUESTION_TYPES,
    Shape,
    describe_scene,
    generate_samples,
    make_dialogue,
    questions_for_scene,
    render_scene,
    shape_bbox,
    shape_centre,
    to_llava_record,
    write_shapes_dataset,
)

SIZES = [(224, 224), (320, 192), (160, 288), (48, 48)]


def _non_background(image: Image.Image) -> int:
    return sum(1 for pixel in image.getdata() if pixel != BACKGROUND)


def test_same_seed_same_data_and_different_seeds_differ():
    a, b = generate_samples(24, seed=7), generate_samples(24, seed=7)
    assert [(s.id, s.question, s.answer, s.qtype, s.shapes) for s in a] == [
        (s.id, s.question, s.answer, s.qtype, s.shapes) for s in b
    ]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b, strict=True))
    assert [s.id for s in generate_samples(5, seed=7)] == [s.id for s in a[:5]]
    other = {s.image.tobytes() for s in generate_samples(24, seed=8)}
    assert not other & {s.image.tobytes() for s in a}
    assert not {s.id for s in generate_samples(24, seed=8)} & {s.id for s in a}


@pytest.mark.parametrize("width,height", SIZES)
def test_images_have_requested_size_and_mode(width, height):
    for sample in generate_samples(8, seed=1, width=width, height=height):
        assert sample.image.mode == "RGB"
        assert sample.image.size == (width, height)


def test_hand_built_scene_questions_and_answers():
    scene = [Shape("cerchio", "rosso", (0, 0)), Shape("quadrato", "blu", (1, 1))]
    assert set(questions_for_scene(scene)) == {
        ("conteggio", "Quante forme ci sono?", "due"),
        ("colore", "Di che colore è il cerchio?", "rosso"),
        ("colore", "Di che colore è il quadrato?", "blu"),
        ("posizione", "Dove si trova il cerchio?", "in alto a sinistra"),
        ("posizione", "Dove si trova il quadrato?", "in basso a destra"),
        ("forma", "Quale forma è rossa?", "il cerchio"),
        ("forma", "Quale forma è blu?", "il quadrato"),
    }


def test_repeated_kind_is_never_asked_about():
    scene = [
        Shape("cerchio", "verde", (0, 2)),
        Shape("cerchio", "giallo", (1, 0)),
        Shape("triangolo", "rosso", (1, 1)),
    ]
    assert set(questions_for_scene(scene)) == {
        ("conteggio", "Quante forme ci sono?", "tre"),
        ("colore", "Di che colore è il triangolo?", "rosso"),
        ("posizione", "Dove si trova il triangolo?", "in basso a destra"),
        ("forma", "Quale forma è verde?", "il cerchio"),
        ("forma", "Quale forma è gialla?", "il cerchio"),
        ("forma", "Quale forma è rossa?", "il triangolo"),
    }
    only_circles = [Shape("cerchio", "verde", (0, 0)), Shape("cerchio", "blu", (0, 1))]
    assert {q[0] for q in questions_for_scene(only_circles)} == {"conteggio", "forma"}


def test_single_shape_count_is_una():
    assert ("conteggio", "Quante forme ci sono?", "una") in questions_for_scene(
        [Shape("triangolo", "giallo", (1, 0))]
    )


@pytest.mark.parametrize("cell", sorted(POSITION_NAMES))
def test_every_cell_is_named_and_drawn_there(cell):
    scene = [Shape("quadrato", "verde", cell, size=1.0, dx=1.0, dy=-1.0)]
    assert ("posizione", "Dove si trova il quadrato?", POSITION_NAMES[cell]) in questions_for_scene(scene)
    width, height = 300, 210
    x0, y0, x1, y1 = shape_bbox(scene[0], width, height)
    row, col = cell
    assert col * width / GRID <= x0 <= x1 < (col + 1) * width / GRID
    assert row * height / GRID <= y0 <= y1 < (row + 1) * height / GRID
    image = render_scene(scene, width, height)
    assert image.getpixel(shape_centre(scene[0], width, height)) == COLOURS["verde"]


@pytest.mark.parametrize("width,height", SIZES)
def test_shapes_inside_image_disjoint_and_centre_has_named_colour(width, height):
    for sample in generate_samples(60, seed=3, width=width, height=height):
        boxes = [shape_bbox(shape, width, height) for shape in sample.shapes]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 < width and 0 <= y0 < y1 < height
        for a, b in combinations(boxes, 2):
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
        for shape in sample.shapes:
            assert sample.image.getpixel(shape_centre(shape, width, height)) == COLOURS[shape.colour]
        alone = sum(_non_background(render_scene([shape], width, height)) for shape in sample.shapes)
        assert _non_background(sample.image) == alone


def test_only_palette_colours_are_used():
    for sample in generate_samples(8, seed=4):
        assert {colour for _, colour in sample.image.getcolors()} <= {BACKGROUND, *COLOURS.values()}


def test_render_rejects_shared_cell_and_tiny_images():
    with pytest.raises(ValueError):
        render_scene([Shape("cerchio", "rosso", (1, 1)), Shape("quadrato", "blu", (1, 1))])
    with pytest.raises(ValueError):
        render_scene([Shape("cerchio", "rosso", (1, 1))], 16, 16)


def test_generated_questions_are_unambiguous_and_correct():
    for sample in generate_samples(200, seed=5, width=64, height=64):
        kinds = Counter(shape.kind for shape in sample.shapes)
        colours = Counter(shape.colour for shape in sample.shapes)
        assert len(colours) == len(sample.shapes)
        assert (sample.qtype, sample.question, sample.answer) in questions_for_scene(sample.shapes)
        if sample.qtype in ("colore", "posizione"):
            (target,) = [shape for shape in sample.shapes if shape.kind in sample.question]
            assert kinds[target.kind] == 1
            expected = target.colour if sample.qtype == "colore" else POSITION_NAMES[target.cell]
            assert sample.answer == expected
        elif sample.qtype == "forma":
            (target,) = [s for s in sample.shapes if sample.question.endswith(f" {FEMININE[s.colour]}?")]
            assert sample.answer == f"il {target.kind}"
        else:
            assert sample.answer == {1: "una", 2: "due", 3: "tre"}[len(sample.shapes)]
        assert sample.answer == normalize_answer(sample.answer)


def test_question_types_are_balanced():
    counts = Counter(sample.qtype for sample in generate_samples(400, seed=6, width=48, height=48))
    assert set(counts) == set(QUESTION_TYPES)
    for qtype in QUESTION_TYPES:
        assert abs(counts[qtype] - 100) <= 10, counts


def test_majority_baseline_is_well_below_target():
    train = generate_samples(1200, seed=10, width=32, height=32)
    held_out = generate_samples(400, seed=11, width=32, height=32)
    baseline = majority_baseline(train, held_out)
    print(f"text-only majority baseline on 400 held-out samples: {baseline:.3f}")
    assert baseline < 0.4
    assert majority_baseline(held_out, held_out) < 0.5


def test_to_llava_record():
    sample = generate_samples(1, seed=0)[0]
    assert to_llava_record(sample, "images/x.png") == {
        "id": sample.id,
        "image": "images/x.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + sample.question},
            {"from": "gpt", "value": sample.answer},
        ],
    }


def test_write_shapes_dataset(tmp_path):
    json_path = write_shapes_dataset(tmp_path / "shapes", n=12, seed=2, width=96, height=64)
    assert json_path == tmp_path / "shapes" / "data.json"
    records = json.loads(json_path.read_text(encoding="utf-8"))
    answers = [
        json.loads(line) for line in (json_path.parent / "answers.jsonl").read_text("utf-8").splitlines()
    ]
    samples = generate_samples(12, seed=2, width=96, height=64)
    assert len(records) == len(answers) == 12
    for record, row, sample in zip(records, answers, samples, strict=True):
        assert record == to_llava_record(sample, record["image"])
        assert row == {
            "id": sample.id,
            "question": sample.question,
            "answer": sample.answer,
            "qtype": sample.qtype,
        }
        with Image.open(json_path.parent / record["image"]) as image:
            assert image.size == (96, 64)
            assert image.convert("RGB").tobytes() == sample.image.tobytes()


def test_description_lists_shapes_in_the_given_order():
    scene = [Shape("triangolo", "blu", (1, 1)), Shape("cerchio", "rosso", (0, 0))]
    assert describe_scene(scene) == "un triangolo blu in basso a destra, un cerchio rosso in alto a sinistra"
    assert (
        describe_scene(scene[::-1])
        == "un cerchio rosso in alto a sinistra, un triangolo blu in basso a destra"
    )


def _answers(turns: list[dict]) -> dict[str, list[str]]:
    by_question: dict[str, list[str]] = {}
    for human, gpt in zip(turns[::2], turns[1::2], strict=True):
        by_question.setdefault(human["value"].removeprefix("<image>\n"), []).append(gpt["value"])
    return by_question


def test_dialogues_ask_every_supported_type_and_describe_the_scene():
    n_dialogues, two_shapes, reading_order, first_turn = 400, 0, 0, Counter()
    for i in range(n_dialogues):
        record, image = make_dialogue(i, seed=4, width=112, height=112)
        turns = record["conversations"]
        assert image.size == (112, 112)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        answers = _answers(turns)
        assert all(len(given) == 1 for given in answers.values()), "a question is asked twice"
        first_turn[turns[0]["value"].removeprefix("<image>\n")] += 1
        # The description names each shape once; the scene is read back from it.
        parts = answers.pop("Descrivi l'immagine.")[0].split(", ")
        shapes = []
        for part in parts:
            _, kind, colour, *place = part.split()
            cell = next(c for c, name in POSITION_NAMES.items() if name == " ".join(place))
            shapes.append(Shape(kind, colour, cell))
        two_shapes += len(shapes) == 2
        reading_order += len(shapes) == 2 and shapes[0].cell < shapes[1].cell
        supported = questions_for_scene(shapes)
        asked = {question: given[0] for question, given in answers.items()}
        assert all(
            (question, answer) in {(q, a) for _, q, a in supported} for question, answer in asked.items()
        )
        for qtype in QUESTION_TYPES:
            of_type = {q for t, q, _ in supported if t == qtype}
            wanted = len(of_type) if qtype in ("posizione", "forma") else min(1, len(of_type))
            assert len(of_type & set(asked)) == wanted, (qtype, record["id"])
    # Two-shape scenes are the hard ones and dominate training; the description's order is random.
    assert abs(two_shapes / n_dialogues - 0.8) < 0.06
    assert abs(reading_order / two_shapes - 0.5) < 0.1
    assert len(first_turn) > 5, "the turns are not shuffled"
    assert make_dialogue(3, seed=4)[0] == make_dialogue(3, seed=4)[0]
