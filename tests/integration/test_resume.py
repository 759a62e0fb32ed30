"""Exact resume: a run killed with SIGKILL and resumed follows the uninterrupted trajectory; SIGTERM
saves a checkpoint and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import latest_checkpoint
from llava_ndino.train.loop import train

MAX_STEPS = 12
ARGS = [
    "recipe=demo",
    f"train.max_steps={MAX_STEPS}",
    "train.save_every=3",
    "train.log_every=1",
    "train.per_device_batch_size=4",
    "train.grad_accum=2",
    "data.synthetic.train=40",
    "data.synthetic.image_size=112",
    "model.tiny.hidden_size=64",
    "train.keep_last=0",
]


def _losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss per step (a resumed run logs some steps twice)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def _start(run_dir: Path, extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llava_ndino.cli", "train", *ARGS, f"output_dir={run_dir}", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for_checkpoint(run_dir: Path, child: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while latest_checkpoint(run_dir) is None:
        if child.poll() is not None:
            pytest.fail(f"training exited early: {child.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.02)


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert train(load_config([*ARGS, f"output_dir={straight}"])).status == "completed"

    resumed = tmp_path / "resumed"
    child = _start(resumed)
    _wait_for_checkpoint(resumed, child)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    killed_at = int(json.loads((latest_checkpoint(resumed) / "trainer_state.json").read_text())["step"])
    assert killed_at < MAX_STEPS, "the child finished before it was killed; nothing was resumed"

    result = train(load_config([*ARGS, f"output_dir={resumed}"]))
    assert result.status == "completed" and result.step == MAX_STEPS

    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in range(1, MAX_STEPS + 1):
        assert abs(expected[step] - got[step]) <= 1e-6, f"step {step}: {expected[step]} vs {got[step]}"
    final_a = load_file(str(straight / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    final_b = load_file(str(resumed / "checkpoints" / f"step_{MAX_STEPS}" / "model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = _start(run_dir, ["train.max_steps=100000", "train.save_every=100000"])
    deadline = time.monotonic() + 240
    while not (run_dir / "metrics.jsonl").is_file():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=120) == 0
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert step >= 1 and step == max(_losses(run_dir))
