"""The run-directory layout and the read side of checkpoints.

A run directory holds::

    config.yaml              the resolved run configuration
    model/                   model config and processor/tokenizer, no weights (the skeleton)
    checkpoints/latest       text file naming the current checkpoint, e.g. "step_1200"
    checkpoints/step_N/      one complete checkpoint (see ``llava_ndino.train.checkpoint``)
    trainer_state.json       inside each checkpoint: {"step": N, "trainer_state": {...}}
    metrics.jsonl            one JSON line per logged step
    train.log                the run's log, as the console shows it
    skipped.jsonl            samples skipped as unusable, with the reason
    data_lengths.json        cached sample lengths for length grouping
    export/                  where ``ndino demo`` writes its HF export
    .lock                    held by the one training process that writes the run
    history.jsonl            settings a resume changed (steps, logging, ...), one line per resume

Everything that reads a run (training resume, ``ndino ask``, ``ndino export``, evaluation) finds its
files through this module; writing checkpoints lives in ``llava_ndino.train.checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
COMPLETE_FILE = "COMPLETE"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
SKELETON_DIR = "model"
SKIPPED_FILE = "skipped.jsonl"
TRAIN_LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
DATA_LENGTHS_FILE = "data_lengths.json"
EXPORT_DIR = "export"
LOCK_FILE = ".lock"
HISTORY_FILE = "history.jsonl"
SHARDS_DIR = "zero"
STEP_DIR = re.compile(r"step_(\d+)")
TMP_PREFIX = ".tmp_"
TRASH_PREFIX = ".trash_"
ALIASES_KEY = "llava_ndino.aliases"
_RESUME_HINT = "pass a run directory, a checkpoint directory (<run_dir>/checkpoints/step_N), 'auto' or 'none'"


class CheckpointError(RuntimeError):
    """A checkpoint or resume target is missing, incomplete or unreadable."""


def rank_rng_file(rank: int) -> str:
    """Name of the RNG file each rank writes in a multi-process checkpoint."""
    return f"rng_rank{rank}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint ``latest`` names, else (with a warning) the newest complete one, else None."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        reason = f"{pointer} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        reason = f"cannot read {pointer} ({exc})"
    else:
        problem = checkpoint_problem(root / name) if STEP_DIR.fullmatch(name) else "not a step_N name"
        if problem is None:
            return root / name
        reason = f"{pointer} names {name!r}, which is unusable: {problem}"
    complete = complete_checkpoints(root)
    if complete:
        logger.warning("%s; falling back to the newest complete checkpoint %s", reason, complete[-1])
        return complete[-1]
    if pointer.exists():
        logger.warning("%s, and no complete checkpoint exists in %s", reason, root)
    return None


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """Turn a ``resume`` option into a checkpoint directory, or None for a fresh start.

    ``"auto"`` resumes from ``run_dir`` if it has a checkpoint (None if it never had one; an error if it
    has a ``latest`` pointer but nothing usable); ``"none"`` or ``""`` never resumes;
    anything else must be a run directory (its latest checkpoint is used) or a checkpoint directory.
    Raises :class:`CheckpointError` naming the path when it cannot be resumed from.
    """
    value = resume.strip()
    if value.lower() in ("", "none"):
        return None
    if value.lower() == "auto":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None and (Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE).exists():
            raise CheckpointError(
                f"{run_dir} has a {LATEST_FILE} pointer but no usable checkpoint; pass a checkpoint "
                "directory to resume from, or 'none' to deliberately start over"
            )
        return ckpt
    path = Path(value).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist; {_RESUME_HINT}")
    if (path / COMPLETE_FILE).exists() or STEP_DIR.fullmatch(path.name):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(
                f"cannot resume from {path}: {problem}; pick another checkpoint in {path.parent} "
                f"or pass the run directory to use its latest complete one"
            )
        return path
    run = path.parent if path.name == CHECKPOINTS_DIR else path
    if not (run / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(
            f"resume path {path} is neither a run directory (no {CHECKPOINTS_DIR}/ inside) nor a "
            f"checkpoint directory (no {COMPLETE_FILE} marker); {_RESUME_HINT}"
        )
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise CheckpointError(
            f"run directory {run} has no complete checkpoint to resume from; {_RESUME_HINT}"
        )
    return ckpt


def load_model_weights(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load only the model state of a complete checkpoint (no optimizer state), e.g. for export."""
    ckpt_dir = Path(ckpt_dir)
    problem = checkpoint_problem(ckpt_dir) or checksum_problem(ckpt_dir, [MODEL_FILE])
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is unusable: {problem}")
    return load_model_state(ckpt_dir / MODEL_FILE, str(torch.device(map_location)))


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    """The ``trainer_state`` a checkpoint was saved with (data position, engine, world size, ...)."""
    return load_trainer_state(Path(ckpt_dir) / TRAINER_STATE_FILE)[1]


def load_model_state(path: Path, device: str) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` and re-tie the aliases recorded in its metadata."""
    with safe_open(path, framework="pt", device=device) as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


def load_trainer_state(path: Path) -> tuple[int, dict[str, Any]]:
    """Read ``trainer_state.json`` into ``(step, trainer_state)``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return int(data["step"]), dict(data["trainer_state"])


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` is not a complete checkpoint, or None if it is."""
    if not ckpt.is_dir():
        return "the directory does not exist"
    try:
        files = dict(json.loads((ckpt / COMPLETE_FILE).read_text(encoding="utf-8"))["files"])
    except FileNotFoundError:
        return f"no {COMPLETE_FILE} marker (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {COMPLETE_FILE} marker ({exc!r})"
    for fname, size in files.items():
        path = ckpt / fname
        if not path.is_file():
            return f"{fname} is missing"
        if path.stat().st_size != size:
            return f"{fname} has {path.stat().st_size} bytes, {COMPLETE_FILE} says {size}"
    return None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in large blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checksum_problem(ckpt: Path, names: list[str]) -> str | None:
    """Why the files ``names`` of checkpoint ``ckpt`` do not match the SHA-256 its ``COMPLETE`` records,
    or None when they do (checkpoints written before checksums were recorded pass on sizes alone)."""
    digests = json.loads((ckpt / COMPLETE_FILE).read_text(encoding="utf-8")).get("sha256") or {}
    for name in names:
        if name in digests and file_sha256(ckpt / name) != digests[name]:
            return f"{name} does not match the SHA-256 recorded when it was saved (the file was altered or damaged)"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step_N`` directories under ``root``, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found) if checkpoint_problem(p) is None]


def find_checkpoint(path: Path) -> Path | None:
    """Return the checkpoint to load for ``path`` (a run dir or a checkpoint dir), or None."""
    if (path / "trainer_state.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"run directory {path} has no complete checkpoint yet")
        return ckpt
    return None
