"""What a run settles before and around its loop: whether it may start or resume, how many steps it
takes, the schedule, gradient checkpointing, free space before a save, and finite weights.
"""

from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

import torch
from transformers import get_scheduler

from llava_ndino.config import RunConfig
from llava_ndino.formats.run_dir import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    CheckpointError,
    complete_checkpoints,
    read_trainer_state,
)
from llava_ndino.train.checkpoint import (
    check_free_space,
)
from llava_ndino.train.engine import (
    Engine,
    check_resumable,
    engine_name,
)
from llava_ndino.train.resume_rules import check_resume_config

log = logging.getLogger(__name__)


def ignore_termination_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT: SLURM signals the whole process group, and the main
    process must still have its workers while it saves the pre-emption checkpoint; it stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_start(cfg: RunConfig, run_dir: Path, checkpoint: Path | None, world_size: int) -> dict:
    """Refuse a start that would mix two runs or a resume the checkpoint cannot honour; return the
    config changes a resume applies."""
    if checkpoint is None:
        if cfg.resume.strip().lower() in ("none", "") and complete_checkpoints(run_dir / CHECKPOINTS_DIR):
            raise ValueError(
                f"resume=none, but {run_dir} already holds a run's checkpoints: starting over there would mix "
                "two runs' metrics and checkpoints; pick a new output_dir, or move the old run away first"
            )
        return {}
    saved = read_trainer_state(checkpoint)
    layout = (saved.get("engine"), saved.get("world_size"))
    check_resumable(checkpoint, layout, (engine_name(cfg.engine, world_size), world_size))
    old_config = (checkpoint / CONFIG_FILE).read_text(encoding="utf-8")
    return check_resume_config(checkpoint, old_config, cfg)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward (non-reentrant checkpoints)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})  # transformers >= 5.x renamed it; the old name warns


def resolve_max_steps(max_steps: int | None, epochs: float | None, samples: int, global_batch: int) -> int:
    """The run's optimizer steps: ``max_steps`` when set, else ``epochs`` passes over ``samples`` in
    steps of ``global_batch`` samples (per device x accumulation x world size), rounded down to whole
    global batches and at least 1, as the HF Trainer counts an epoch (558,128 captions at 256 per step:
    2180 steps)."""
    if max_steps is not None:
        return max_steps
    if epochs is None:
        raise ValueError("set train.max_steps or train.epochs")
    if samples < 1:
        raise ValueError(
            f"train.epochs={epochs}: the training data hold no samples, so an epoch has no steps"
        )
    steps = max(1, math.floor(epochs * samples / global_batch))
    log.info(
        "train.epochs=%s: %d samples / global batch %d -> max_steps %d", epochs, samples, global_batch, steps
    )
    return steps


def make_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, max_steps: int):
    """The learning-rate schedule of ``cfg.train`` over ``max_steps``: linear warmup, then cosine, linear
    or constant."""
    return get_scheduler(
        "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * max_steps),
        num_training_steps=max_steps,
    )


def nonfinite_parameters(model: torch.nn.Module) -> int:
    """How many of this rank's parameter tensors (its shard, under ZeRO-3) hold a NaN or an Inf."""
    with torch.no_grad():
        return sum(int(not torch.isfinite(p).all()) for p in model.parameters() if p.numel())


def agree_on_free_space(engine: Engine, run_dir: Path) -> None:
    """Rank 0 checks the free space for the next checkpoint; every rank stops together when it is short."""
    error = None
    if engine.is_main:
        try:
            check_free_space(run_dir)
        except CheckpointError as exc:
            error = exc
    if engine.all_reduce_sum(float(error is not None)):
        raise error or CheckpointError(f"rank 0 found no space for the next checkpoint in {run_dir}")
