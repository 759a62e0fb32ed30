"""train.epochs: max_steps computed from the data size and the global batch, for map-style data (the
demo's synthetic set) and for shard folders (their index.json counts); exactly one of the two keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ndino.config import RecipeError, load_config
from llava_ndino.prep.shards import llava_items, write_shards
from llava_ndino.train.loop import train
from llava_ndino.train.setup import resolve_max_steps

SMALL_DEMO = [
    "recipe=demo",
    "model.tiny.hidden_size=64",
    "model.tiny.layers=1",
    "train.per_device_batch_size=2",
    "train.grad_accum=2",
    "train.log_every=1",
    "train.save_every=100",
    "train.cpu_threads=1",
    "train.max_steps=null",
]


def _trained_steps(run_dir: Path) -> tuple[int, int]:
    """(the last checkpoint's step, the step count it records), from the run directory's files."""
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    return state["step"], state["trainer_state"]["max_steps"]


def test_epochs_and_max_steps_exclude_each_other() -> None:
    with pytest.raises(RecipeError, match="both set"):
        load_config(["recipe=demo", "train.epochs=1"])  # the demo recipe sets train.max_steps
    with pytest.raises(RecipeError, match="missing required") as info:
        load_config(["recipe=demo", "train.max_steps=null"])
    assert "train.max_steps=" in str(info.value) and "train.epochs=" in str(info.value)
    with pytest.raises(RecipeError, match="train.epochs"):
        load_config(["recipe=demo", "train.max_steps=null", "train.epochs=0"])
    cfg = load_config(["recipe=demo", "train.max_steps=null", "train.epochs=1.5"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (None, 1.5)


def test_step_count_rounds_down_to_whole_global_batches() -> None:
    assert resolve_max_steps(7, None, 10, 4) == 7
    assert resolve_max_steps(None, 1, 12, 4) == 3
    assert resolve_max_steps(None, 1, 13, 4) == 3  # the 13th sample does not make a global batch
    assert resolve_max_steps(None, 2.5, 12, 4) == 7
    assert resolve_max_steps(None, 1, 558_128, 16 * 4 * 4) == 2180  # align: one epoch of BLIP-558k at 256
    assert resolve_max_steps(None, 0.01, 12, 4) == 1
    with pytest.raises(ValueError, match="no samples"):
        resolve_max_steps(None, 1, 0, 4)


def test_epochs_on_the_demo_recipe_stop_after_one_pass(tmp_path: Path) -> None:
    """12 samples, global batch 2 x 2 = 4, 1 epoch: 3 steps, logged, scheduled and saved."""
    run_dir = tmp_path / "run"
    cfg = load_config(
        [
            *SMALL_DEMO,
            "data.synthetic.train=12",
            "data.synthetic.image_size=112",
            "train.epochs=1",
            f"output_dir={run_dir}",
        ]
    )
    result = train(cfg)
    assert (result.status, result.step) == ("completed", 3)
    assert _trained_steps(run_dir) == (3, 3)
    assert (
        "train.epochs=1.0: 12 samples / global batch 4 -> max_steps 3" in (run_dir / "train.log").read_text()
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12), "the cosine schedule ends at the computed step"
    again = train(cfg)  # a resumed run computes the same count and has nothing left to do
    assert (again.status, again.step) == ("completed", 3)


def test_epochs_on_a_shard_folder_count_the_index(shapes_json: Path, tmp_path: Path) -> None:
    """24 samples in shards of 5 (index.json counts), global batch 4, 0.5 epochs: 3 steps."""
    shards = tmp_path / "shards"
    index = write_shards(llava_items(shapes_json, None), shards, 5, source=str(shapes_json))
    assert index["samples"] == 24 and len(index["shards"]) == 5
    run_dir = tmp_path / "run"
    overrides = [
        "data.synthetic.kind=null",
        f"data.path={shards}",
        "train.epochs=0.5",
        f"output_dir={run_dir}",
    ]
    result = train(load_config([*SMALL_DEMO, *overrides]))
    assert (result.status, result.step) == ("completed", 3)
    assert _trained_steps(run_dir) == (3, 3)
    assert "24 samples / global batch 4 -> max_steps 3" in (run_dir / "train.log").read_text()
