"""Resuming a ZeRO checkpoint reads DeepSpeed's shards with a weights-only unpickler: a pickled payload
planted in a shard (with a forged COMPLETE manifest) refuses the resume instead of running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_ndino.formats.run_dir import file_sha256

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "recipe=demo",
    "train.save_every=2",
    "train.per_device_batch_size=2",
    "train.cpu_threads=1",
    "data.synthetic.train=16",
    "model.tiny.hidden_size=64",
    "engine=zero2",
]


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torchrun(run: Path, steps: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "launch" / "train.py"), *ARGS, f"train.max_steps={steps}", f"output_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NDINO_DIST_TIMEOUT_MIN": "2", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_payload_in_a_zero_shard_refuses_the_resume(tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert _torchrun(run, 2).returncode == 0
    checkpoint = run / "checkpoints" / "step_2"
    shard = checkpoint / "zero" / "mp_rank_00_model_states.pt"
    state = torch.load(shard, weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, shard)
    manifest = json.loads((checkpoint / "COMPLETE").read_text())
    manifest["files"]["zero/mp_rank_00_model_states.pt"] = shard.stat().st_size  # forge the sizes and
    manifest["sha256"]["zero/mp_rank_00_model_states.pt"] = file_sha256(shard)  # the checksum too
    (checkpoint / "COMPLETE").write_text(json.dumps(manifest))

    resumed = _torchrun(run, 3)
    assert resumed.returncode != 0
    assert "refusing checkpoint shard" in resumed.stderr + resumed.stdout
    assert "asks for posix.system" in resumed.stderr + resumed.stdout
    assert not marker.exists()
