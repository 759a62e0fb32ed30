"""Tests of ``llava_ndino.train.checkpoint``: round trips, pruning, resume, crash safety and SIGTERM."""

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from llava_ndino.formats.run_dir import CheckpointError, latest_checkpoint, resolve_resume
from llava_ndino.train.checkpoint import (
    install_termination_handler,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from tests.helpers import save_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 60

# Saves step 1, then hangs right after the first fsync of a path named argv[2] while saving step 2
# and announces that by creating argv[3]; the parent then SIGKILLs it.
CRASH_CHILD = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    import torch
    from llava_ndino.train import checkpoint as ck

    run_dir, kill_after, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def save(step):
        ck.save_checkpoint(
            run_dir, step, model_state={"w": torch.full((256, 1024), float(step))},
            optimizer_state={"state": {}, "param_groups": []}, scheduler_state={"last_epoch": step},
            trainer_state={"consumed_samples": 8 * step}, config_text="seed: 0\\n", keep_last=3,
        )

    save(1)
    real_fsync = ck._fsync

    def fsync_then_hang(path):
        real_fsync(path)
        if path.name == kill_after:
            ready.touch()
            threading.Event().wait()

    ck._fsync = fsync_then_hang
    save(2)
    sys.exit("the save of step 2 finished without reaching the kill point")
    """
)

# Polls the termination flag like a training loop, then "saves" and exits 0.
SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from llava_ndino.train import checkpoint as ck

    run_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
    flag = ck.install_termination_handler()
    ready.touch()
    step, deadline = 0, time.monotonic() + 60
    while not flag.requested:
        if time.monotonic() > deadline:
            sys.exit("no signal arrived")
        step += 1
        time.sleep(0.001)
    ck.save_checkpoint(
        run_dir, step, model_state={"w": torch.zeros(3)}, optimizer_state=None, scheduler_state=None,
        trainer_state={"signal": flag.signum}, config_text="", keep_last=1,
    )
    sys.exit(0)
    """
)


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def _spawn(code: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Poll until ``path`` exists; fail if the child exits first or the timeout passes."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited with {proc.returncode} before {path.name}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child did not create {path.name} within {CHILD_TIMEOUT_S}s")
        time.sleep(0.01)


def _make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, x: torch.Tensor) -> None:
    model(x).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _decay(step: int) -> float:
    return 1.0 / (1 + step)


def test_round_trip_model_optimizer_scheduler_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
    for _ in range(3):
        _train_step(model, opt, sched, torch.randn(5, 4))
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(3)
    trainer_state = {"epoch": 1, "consumed_samples": 15, "data": {"shard": 2, "offset": 7}}

    path = save_checkpoint(
        tmp_path,
        3,
        model_state=model.state_dict(),
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        trainer_state=trainer_state,
        config_text="model: tiny\n",
        keep_last=2,
    )
    expected = (random.random(), np.random.standard_normal(4), torch.rand(4))

    assert path == tmp_path / "checkpoints" / "step_3"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_3\n"
    assert sorted(os.listdir(path)) == sorted(
        ["COMPLETE", "config.yaml", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt"]
        + ["trainer_state.json"]
    )
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    loaded = load_checkpoint(path)
    restore_rng_state(loaded.rng_state)
    assert random.random() == expected[0]
    np.testing.assert_array_equal(np.random.standard_normal(4), expected[1])
    assert torch.equal(torch.rand(4), expected[2])

    assert (loaded.path, loaded.step, loaded.trainer_state) == (path, 3, trainer_state)
    assert loaded.config_text == "model: tiny\n"
    model2 = _make_model()
    model2.load_state_dict(loaded.model_state)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, _decay)  # built first: it resets the group lr
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.scheduler_state)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()
    x = torch.randn(5, 4)
    _train_step(model, opt, sched, x)
    _train_step(model2, opt2, sched2, x)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restore_rng_warns_about_missing_cuda_devices(tmp_path: Path, caplog) -> None:
    state = load_checkpoint(save_tiny_checkpoint(tmp_path, 1)).rng_state
    state["cuda"] = [*torch.cuda.get_rng_state_all(), torch.zeros(16, dtype=torch.uint8)]  # one too many
    with caplog.at_level(logging.WARNING):
        restore_rng_state(state)
    assert "CUDA device" in caplog.text


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_tied_shared_and_non_contiguous_tensors(tmp_path: Path) -> None:
    model = TiedLM()
    flat = torch.arange(10.0)
    state = {
        **model.state_dict(),
        "transposed": torch.arange(15.0).reshape(3, 5).t(),  # non-contiguous
        "overlap": model.embed.weight[2:5],  # overlaps the tied weight: must be copied
        "half_a": flat[:5],  # disjoint views of one buffer: stored as they are
        "half_b": flat[5:],
    }
    path = save_checkpoint(
        tmp_path,
        1,
        model_state=state,
        optimizer_state=None,
        scheduler_state=None,
        trainer_state={},
        config_text="",
        keep_last=1,
    )
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "half_a", "half_b", "overlap", "transposed"]

    loaded = load_checkpoint(path).model_state
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert loaded["head.weight"] is loaded["embed.weight"]
    fresh = TiedLM()
    fresh.load_state_dict({k: loaded[k] for k in ("embed.weight", "head.weight")})
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.head.weight, model.embed.weight)


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_tiny_checkpoint(tmp_path, step, keep_last=2)
    assert _steps(tmp_path) == ["step_4", "step_5"]

    save_tiny_checkpoint(tmp_path, 3, keep_last=1)  # resumed from an older checkpoint: latest is never pruned
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_3\n"
    assert _steps(tmp_path) == ["step_3", "step_5"]

    for step in (6, 7):
        save_tiny_checkpoint(tmp_path, step, keep_last=0)
    assert _steps(tmp_path) == ["step_3", "step_5", "step_6", "step_7"]
    with pytest.raises(ValueError, match="keep_last"):
        save_tiny_checkpoint(tmp_path, 8, keep_last=-1)


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path, 1, value=1.0)
    path = save_tiny_checkpoint(tmp_path, 1, value=2.0)
    assert torch.equal(load_checkpoint(path).model_state["w"], torch.full((3,), 2.0))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_1"]


def test_unserialisable_trainer_state_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save_checkpoint(
            tmp_path,
            1,
            model_state={"w": torch.zeros(1)},
            optimizer_state=None,
            scheduler_state=None,
            trainer_state={"bad": object()},
            config_text="",
            keep_last=1,
        )
    assert not (tmp_path / "checkpoints").exists()


def test_load_rejects_incomplete_or_corrupt_checkpoints(tmp_path: Path) -> None:
    path = save_checkpoint(
        tmp_path,
        1,
        model_state={"w": torch.zeros(4)},
        optimizer_state={"state": {}, "param_groups": []},
        scheduler_state=None,
        trainer_state={},
        config_text="",
        keep_last=1,
    )
    optimizer = path / "optimizer.pt"
    optimizer.write_bytes(b"x" * optimizer.stat().st_size)
    with pytest.raises(CheckpointError, match=f"{path}.*optimizer.pt does not match the SHA-256"):
        load_checkpoint(path)

    model = path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=f"{path}.*model.safetensors has"):
        load_checkpoint(path)

    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=f"{path}.*no COMPLETE marker"):
        load_checkpoint(path)


# Where the save of step 2 is killed: the fsync of this file or directory (its first one in that save).
KILL_POINTS = {
    "model.safetensors": "temp dir half written",
    "COMPLETE": "temp dir complete, not renamed yet",
    "checkpoints": "step_2 renamed into place, latest not updated yet",
    "latest.tmp": "new pointer written, not swapped in yet",
}


@pytest.mark.parametrize("kill_after", KILL_POINTS)
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path, caplog, kill_after: str) -> None:
    ready = tmp_path / "ready"
    proc = _spawn(CRASH_CHILD, tmp_path, kill_after, ready)
    _wait_for(ready, proc)
    proc.kill()
    assert proc.wait(timeout=CHILD_TIMEOUT_S) == -signal.SIGKILL

    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_1\n"
    assert bool(list(root.glob(".tmp_step_2"))) == (kill_after in ("model.safetensors", "COMPLETE"))
    for step_dir in root.glob("step_*"):  # anything named step_N must be complete
        load_checkpoint(step_dir)
    with caplog.at_level(logging.WARNING):
        resumed = resolve_resume("auto", tmp_path)
    assert resumed == root / "step_1" and not caplog.records
    loaded = load_checkpoint(resumed)
    assert loaded.step == 1 and loaded.trainer_state == {"consumed_samples": 8}
    assert torch.equal(loaded.model_state["w"], torch.full((256, 1024), 1.0))

    save_tiny_checkpoint(tmp_path, 2, keep_last=3, value=5.0)
    assert latest_checkpoint(tmp_path) == root / "step_2"
    assert torch.equal(load_checkpoint(root / "step_2").model_state["w"], torch.full((3,), 5.0))
    assert sorted(os.listdir(root)) == ["latest", "step_1", "step_2"]


def test_sigterm_lets_the_loop_save_and_exit_zero(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = _spawn(SIGTERM_CHILD, tmp_path, ready)
    _wait_for(ready, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=CHILD_TIMEOUT_S) == 0, proc.stderr.read()
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.step >= 1 and loaded.trainer_state == {"signal": signal.SIGTERM}


def test_termination_flag_restores_handlers_and_second_sigint_aborts() -> None:
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    flag = install_termination_handler()
    try:
        assert not flag.requested
        signal.raise_signal(signal.SIGINT)
        assert flag.requested and flag.signum == signal.SIGINT
        signal.raise_signal(signal.SIGTERM)  # a repeated SIGTERM only keeps the flag set
        assert flag.requested and flag.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a SIGINT while a stop is pending aborts at once
            signal.raise_signal(signal.SIGINT)
    finally:
        flag.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
