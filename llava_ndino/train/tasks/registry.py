"""The objective registry: ``objective`` name -> task class, listed explicitly (no import side effects)."""

from __future__ import annotations

from llava_ndino.config import RunConfig
from llava_ndino.train.tasks.base import Task
from llava_ndino.train.tasks.text import ClmTask, DpoTask, SftTask
from llava_ndino.train.tasks.vlm import VlmSftTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (VlmSftTask, ClmTask, SftTask, DpoTask)}
"""Objective name -> task class."""


def make_task(cfg: RunConfig) -> Task:
    """Return the task for ``cfg.objective``."""
    if cfg.objective not in TASKS:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.objective](cfg)
