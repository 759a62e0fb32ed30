"""Pre-emption as SLURM does it: SIGTERM to the whole process group (loader workers included) still
saves and exits 0, and a run killed with -9 then resumed records each step once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_ndino.config import load_config
from llava_ndino.formats.run_dir import latest_checkpoint
from llava_ndino.train.loop import train

pytestmark = pytest.mark.slow
ARGS = [
    "recipe=demo",
    "train.log_every=1",
    "train.per_device_batch_size=4",
    "data.synthetic.train=400",
    "data.synthetic.image_size=112",
    "model.tiny.hidden_size=64",
    "train.cpu_threads=1",
]


def _start(run: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llava_ndino.cli", "train", *ARGS, f"output_dir={run}", *extra]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _wait_for(path: Path, child: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_zero(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = _start(run, "data.num_workers=2", "train.max_steps=100000", "train.save_every=100000")
    _wait_for(run / "metrics.jsonl", child)
    os.killpg(child.pid, signal.SIGTERM)  # workers get it too, as under scancel or a time limit
    assert child.wait(timeout=120) == 0, child.stderr.read().decode()[-2000:]
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == f"step_{max(_steps(run))}"


def test_a_resumed_run_records_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = _start(run, "train.max_steps=40", "train.save_every=3")
    _wait_for(run / "checkpoints" / "step_3", child)
    while max(_steps(run), default=0) < 5:  # steps after the checkpoint, redone after the resume
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
    resumed_at = int(latest_checkpoint(run).name.split("_")[1])
    assert max(_steps(run)) > resumed_at
    train(load_config([*ARGS, f"output_dir={run}", "train.max_steps=40", "train.save_every=3"]))
    assert _steps(run) == list(range(1, 41))
