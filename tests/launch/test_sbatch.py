"""The SLURM template (launch/slurm/train.sbatch) launches torchrun as intended, requeues on the
time-limit warning and waits for the save on SIGTERM; `srun` and `scontrol` are stubs."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from torch.distributed.run import get_args_parser

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


def _slurm_stubs(tmp_path: Path) -> dict[str, str]:
    """Fake `srun` and `scontrol` on PATH that record their arguments; returns the job's environment."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {out}/srun_args\n'
        f"echo $$ > {out}/srun_pid\n"
        f"trap 'touch {out}/srun_got_term; exit 0' TERM\n"
        'while [[ -n "${STUB_SRUN_WAIT:-}" ]]; do sleep 0.05; done\n'
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {out}/scontrol_calls\n'
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-7\\ngpu-8\\n"; fi\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "gpu-[7-8]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "NDINO_REPO": str(REPO),
        "NDINO_VENV": "/opt/ndino-venv",
    }


def test_sbatch_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    header = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--gpus-per-node=4", "--ntasks-per-node=1", "--requeue", "--signal=B:USR1@300"):
        assert f"#SBATCH {option}" in header


def test_sbatch_runs_torchrun_with_a_rendezvous_on_the_first_node(tmp_path: Path) -> None:
    env = _slurm_stubs(tmp_path)
    args = ["recipe=long_it", "init_from=runs/short_it", "output_dir=runs/long it"]
    done = subprocess.run(["bash", str(SBATCH), *args], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    srun = (tmp_path / "out" / "srun_args").read_text().splitlines()
    torchrun = srun.index("/opt/ndino-venv/bin/torchrun")
    parsed = get_args_parser().parse_args(srun[torchrun + 1 :])  # torchrun's own parser accepts them
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.rdzv_backend) == ("2", "4", "c10d")
    assert (parsed.rdzv_endpoint, parsed.rdzv_id) == ("gpu-7:29821", "4321")
    assert parsed.training_script == "launch/train.py" and (REPO / parsed.training_script).is_file()
    assert parsed.training_script_args == args, shlex.join(srun)
    assert "requeue" not in (tmp_path / "out" / "scontrol_calls").read_text()


def _start_job(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """Start the batch script with an srun that runs until SIGTERM; return it and srun's pid."""
    env = {**_slurm_stubs(tmp_path), "STUB_SRUN_WAIT": "1"}
    job = subprocess.Popen(["bash", str(SBATCH), "recipe=long_it"], env=env, stdout=subprocess.DEVNULL)
    pid_file = tmp_path / "out" / "srun_pid"
    deadline = time.monotonic() + 20
    while not pid_file.is_file() or not pid_file.read_text().strip():
        assert job.poll() is None and time.monotonic() < deadline, "srun did not start"
        time.sleep(0.02)
    return job, int(pid_file.read_text())


def test_time_limit_warning_stops_the_training_and_requeues(tmp_path: Path) -> None:
    job, _ = _start_job(tmp_path)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=20) == 0
    assert (tmp_path / "out" / "srun_got_term").is_file(), "the training got SIGTERM"
    assert "requeue 4321" in (tmp_path / "out" / "scontrol_calls").read_text()


def test_sigterm_waits_for_the_save_and_does_not_requeue(tmp_path: Path) -> None:
    job, srun_pid = _start_job(tmp_path)
    job.send_signal(signal.SIGTERM)  # scancel: SLURM signals the batch script and the job steps
    time.sleep(0.3)
    assert job.poll() is None, "the batch script waits while the training saves"
    os.kill(srun_pid, signal.SIGTERM)
    assert job.wait(timeout=20) == 0
    assert "requeue" not in (tmp_path / "out" / "scontrol_calls").read_text()
