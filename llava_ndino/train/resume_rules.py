"""What a resumed run may change: the checkpoint's config against the new one, before anything is written.

Keys that change the model or the objective are refused (the checkpoint's weights would not fit, or
would be trained towards something else); keys whose value the restored optimiser and scheduler
state would silently override are refused too, since ``config.yaml`` would show a value the run does
not use. Everything else (steps, logging, data loading, ...) applies for real and is recorded in the
run's ``history.jsonl``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from llava_ndino.config import RunConfig, upgrade_legacy_keys
from llava_ndino.formats.run_dir import HISTORY_FILE

MODEL_KEYS = ("model.", "objective", "lora.", "dpo.", "data.template", "init_from")
"""Prefixes of keys that define the model or the objective: a checkpoint is only resumable under them."""
OPTIMIZER_KEYS = (
    "train.lr",
    "train.lr_vision",
    "train.lr_projector",
    "train.weight_decay",
    "train.optimizer",
    "train.schedule",
    "train.warmup_ratio",
    "train.trainable",
    "train.max_grad_norm",
)
"""Keys the restored optimiser and scheduler state carry (learning rates, decay, parameter groups)."""
FREE_KEYS = ("recipe", "description", "output_dir", "resume")
"""Keys that never matter to a resume."""


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        out: dict[str, Any] = {}
        for key, value in values.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: values}


def config_changes(old_yaml: str, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (checkpoint's value, new value) for every key that differs (``FREE_KEYS`` aside)."""
    old = _flat(upgrade_legacy_keys(yaml.safe_load(old_yaml) or {}))
    current = _flat(OmegaConf.to_container(OmegaConf.structured(new)))
    keys = sorted(old.keys() | current.keys())
    return {
        key: (old.get(key), current.get(key))
        for key in keys
        if old.get(key) != current.get(key) and not key.startswith(FREE_KEYS)
    }


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_resume_config(checkpoint: Path, old_yaml: str, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Raise ValueError for changes a resume cannot honour; return the changes that apply."""
    changes = config_changes(old_yaml, new)
    model = {k: v for k, v in changes.items() if k.startswith(MODEL_KEYS)}
    if model:
        raise ValueError(
            f"cannot resume {checkpoint} with a different model or objective ({_listed(model)}): keep the "
            "checkpoint's values, or start a new run in another output_dir (init_from=RUN copies its weights)"
        )
    optimizer = {k: v for k, v in changes.items() if k in OPTIMIZER_KEYS}
    if optimizer:
        raise ValueError(
            f"cannot resume {checkpoint} with other optimiser settings ({_listed(optimizer)}): the restored "
            "optimiser and scheduler state would override them; keep the checkpoint's values, or start a "
            "new run in another output_dir with init_from=RUN"
        )
    return changes


def record_changes(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the settings a resume changed to ``run_dir/history.jsonl``."""
    if not changes:
        return
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step, "changes": changes}
    with open(Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
