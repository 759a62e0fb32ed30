"""NaN and Inf: a non-finite step never reaches the weights, a run of them stops the run, and weights that
are not finite are never saved over the last good checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import latest_checkpoint
from llava_ndino.train import loop
from llava_ndino.train.tasks.vlm import VlmSftTask

BASE = ["recipe=demo", "model.tiny.hidden_size=64", "data.synthetic.image_size=112", "train.cpu_threads=1"]


def _poison_losses(monkeypatch, bad_calls: set[int]) -> None:
    """Make the loss of the listed forward calls (0-based) NaN, as a bad sample or an overflow would."""
    original, calls = VlmSftTask.loss_sum, [0]

    def loss_sum(self, module, batch):
        loss, stats = original(self, module, batch)
        calls[0] += 1
        return (loss * float("nan") if calls[0] - 1 in bad_calls else loss), stats

    monkeypatch.setattr(VlmSftTask, "loss_sum", loss_sum)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nan_step_is_skipped_and_counted(tmp_path: Path, monkeypatch) -> None:
    _poison_losses(monkeypatch, {1})
    run = tmp_path / "run"
    result = loop.train(load_config([*BASE, f"output_dir={run}", "train.max_steps=3", "train.log_every=1"]))
    assert result.status == "completed" and result.step == 3
    rows = _metrics(run)
    assert [row["nonfinite_steps"] for row in rows] == [0, 1, 0]
    assert math.isnan(rows[1]["loss"]) and all(math.isfinite(row["loss"]) for row in (rows[0], rows[2]))
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    args = [*BASE, f"output_dir={run}", "train.save_every=2", "train.log_every=1"]
    loop.train(load_config([*args, "train.max_steps=2"]))
    good = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    _poison_losses(monkeypatch, set(range(100)))
    with pytest.raises(FloatingPointError, match=f"{loop.MAX_NONFINITE_IN_A_ROW} steps in a row"):
        loop.train(load_config([*args, "train.max_steps=20"]))
    # steps 3-7 were skipped: checkpoints 4 and 6 hold the step-2 weights, nothing non-finite
    assert latest_checkpoint(run).name == "step_6"
    kept = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.equal(kept[key], good[key]) for key in good)


def test_non_finite_weights_are_never_saved(tmp_path: Path, monkeypatch) -> None:
    original = loop.nonfinite_parameters
    monkeypatch.setattr(loop, "nonfinite_parameters", lambda model: original(model) + 1)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="hold NaN or Inf; not saving them"):
        loop.train(load_config([*BASE, f"output_dir={run}", "train.max_steps=1"]))
    assert latest_checkpoint(run) is None


def test_the_finiteness_check_sees_a_nan_parameter() -> None:
    model = torch.nn.Linear(2, 2)
    assert loop.nonfinite_parameters(model) == 0
    with torch.no_grad():
        model.bias[0] = float("inf")
    assert loop.nonfinite_parameters(model) == 1
