"""The NDiNO stage recipes (align, adapt, short_it, long_it): every shipped recipe validates, the stage
recipes carry DESIGN.md §3's settings, the stages train and chain through init_from on tiny models,
and the SLURM template launches torchrun as intended and requeues on the time-limit warning."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import time
from operator import attrgetter
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from llava_ndino.config import list_recipes, load_config, recipes_dir
from llava_ndino.train.loop import train

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
STAGES = ["align", "adapt", "short_it", "long_it"]
ALL_PARTS = ["vision", "projector", "llm", "newline"]
# DESIGN.md §3 "NDiNO stages" (and the release scripts it summarises), per stage
EXPECTED = {
    "align": {
        "train.trainable": ["projector"],
        "train.lr": 1e-3,
        "data.template": "plain",
        "data.mixture": "align",
        "engine": "zero2",
        "init_from": None,
    },
    "adapt": {
        "train.trainable": ALL_PARTS,
        "train.lr": 1e-5,
        "train.lr_vision": 2e-6,
        "train.per_device_batch_size": 2,
        "train.grad_accum": 8,
        "train.schedule": "cosine",
        "train.warmup_ratio": 0.03,
        "train.weight_decay": 0.0,
        "train.gradient_checkpointing": True,
        "data.max_length": 8192,
        "data.template": "plain",
        "data.mixture": "adapt",
        "model.dtype": "bfloat16",
        "engine": "zero3",
        "init_from": "runs/align",
    },
    "short_it": {
        "train.trainable": ALL_PARTS,
        "data.template": "llama3",
        "data.mixture": "short_it",
        "engine": "zero3",
        "init_from": "runs/adapt",
    },
    "long_it": {
        "train.trainable": ALL_PARTS,
        "train.max_steps": 500,
        "train.per_device_batch_size": 4,
        "train.grad_accum": 4,
        "train.lr": 1e-5,
        "train.lr_vision": 2e-6,
        "data.template": "llama3",
        "data.mixture": "long_it",
        "engine": "zero3",
        "init_from": "runs/short_it",
    },
}
# tiny and fast: what a CPU run adds to a stage recipe besides the model folders
TINY = [
    "engine=single",
    "train.global_batch_size=0",
    "model.dtype=float32",
    "data.mixture=null",
    "data.synthetic.kind=shapes",
    "data.synthetic.train=8",
    "data.synthetic.image_size=112",
    "data.num_workers=0",
    "train.per_device_batch_size=2",
    "train.grad_accum=1",
    "train.max_steps=2",
    "train.log_every=1",
    "train.cpu_threads=1",
]


@pytest.mark.parametrize("path", sorted(recipes_dir().glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(path: Path) -> None:
    cfg = load_config([f"recipe={path.stem}"])
    assert cfg.description and cfg.output_dir and cfg.train.max_steps >= 1


@pytest.mark.parametrize("stage", STAGES)
def test_stage_recipe_carries_the_release_settings(stage: str) -> None:
    cfg = load_config([f"recipe={stage}"])
    got = {key: attrgetter(key)(cfg) for key in EXPECTED[stage]}
    assert got == EXPECTED[stage]
    assert cfg.model.source == "components" and cfg.objective == "vlm_sft"
    if stage != "align":  # every full fine-tuning stage shares the release's optimiser settings
        assert (cfg.train.lr, cfg.train.lr_vision, cfg.train.weight_decay) == (1e-5, 2e-6, 0.0)
        assert (cfg.train.schedule, cfg.train.warmup_ratio) == ("cosine", 0.03)
        assert (cfg.data.max_length, cfg.train.gradient_checkpointing) == (8192, True)


def test_stage_recipes_are_listed_with_descriptions() -> None:
    listed = dict(list_recipes())
    assert all(listed.get(stage) for stage in STAGES)


def test_model_folders_come_from_ndino_models(monkeypatch) -> None:
    monkeypatch.delenv("NDINO_MODELS", raising=False)
    assert load_config(["recipe=adapt"]).model.vision == "models/clip-vit-large-patch14-336"
    monkeypatch.setenv("NDINO_MODELS", "/shared/models")
    cfg = load_config(["recipe=long_it"])
    assert (cfg.model.vision, cfg.model.llm, cfg.model.llava) == (
        "/shared/models/clip-vit-large-patch14-336",
        "/shared/models/Meta-Llama-3-8B",
        "/shared/models/llama3-llava-next-8b-hf",
    )


def _last_loss(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"]


def _train_stage(stage: str, run_dir: Path, *extra: str) -> None:
    result = train(load_config([f"recipe={stage}", *TINY, f"output_dir={run_dir}", *extra]))
    assert (result.status, result.step) == ("completed", 2)
    assert math.isfinite(_last_loss(run_dir)) and _last_loss(run_dir) > 0


def test_stages_chain_through_init_from(tiny_dirs, tmp_path: Path) -> None:
    """pt_short_long on tiny folders: align -> adapt -> short_it -> long_it, each from the last."""
    models = [f"model.vision={tiny_dirs['vision']}", f"model.llm={tiny_dirs['llm']}"]
    previous = "null"
    for stage in STAGES:
        _train_stage(stage, tmp_path / stage, *models, f"init_from={previous}")
        log = (tmp_path / stage / "train.log").read_text()
        assert ("init_from: loaded" in log) == (previous != "null"), stage
        previous = str(tmp_path / stage)


def test_stages_from_an_existing_lmm(tiny_llava_dir, tmp_path: Path) -> None:
    """short_long: short_it from an HF LlavaNext folder (model.source=llava), then long_it from that run."""
    start = ["model.source=llava", f"model.llava={tiny_llava_dir}"]
    _train_stage("short_it", tmp_path / "short_it", *start, "init_from=null")
    _train_stage("long_it", tmp_path / "long_it", *start, f"init_from={tmp_path / 'short_it'}")


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
