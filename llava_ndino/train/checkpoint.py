"""Crash-safe training checkpoints, resume resolution and SLURM pre-emption handling.

Layout of a run directory::

    run_dir/checkpoints/
        latest                   text file naming the current checkpoint, e.g. "step_1200"
        step_1200/
            model.safetensors    model weights; tied tensors are stored once and re-tied on load
            optimizer.pt         optimizer state_dict (absent when None was passed)
            scheduler.pt         LR scheduler state_dict (absent when None was passed)
            rng.pt               capture_rng_state() of the saving process (rank 0)
            rng_rank{R}.pt       every rank's RNG states, in multi-process runs
            zero/                DeepSpeed's per-rank model and optimiser shards (ZeRO engines)
            trainer_state.json   {"step": N, "trainer_state": {...}} (data position, epoch, ...)
            config.yaml          the run config
            COMPLETE             written last: JSON manifest of every file above and its size
        .tmp_step_1300/          a save in progress, or one killed mid-way (removed by the next save)

A save goes to a temp dir, is fsynced, renamed to ``step_N`` and only then is ``latest`` replaced, so
a crash at any point (SIGKILL, node failure, time limit) leaves the previous checkpoint usable.
In multi-process runs every rank first writes its shards and RNG file into the temp dir
(:func:`prepare_checkpoint_dir`, :func:`checkpoint_tmp_dir`), then rank 0 alone finishes the save
with :func:`save_checkpoint`; only one run may save into a run directory at a time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from llava_ndino.formats.run_dir import (
    ALIASES_KEY,
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    CONFIG_FILE,
    LATEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    SHARDS_DIR,
    TMP_PREFIX,
    TRAINER_STATE_FILE,
    TRASH_PREFIX,
    CheckpointError,
    checkpoint_problem,
    checksum_problem,
    complete_checkpoints,
    file_sha256,
    latest_checkpoint,
    load_model_state,
    load_trainer_state,
    rank_rng_file,
)
from llava_ndino.formats.tensor_files import save_safetensors

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """Everything :func:`save_checkpoint` wrote, loaded back by :func:`load_checkpoint`."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    scheduler_state: dict | None
    rng_state: dict[str, Any]
    trainer_state: dict[str, Any]
    config_text: str


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the python, numpy, torch CPU and all CUDA generators (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (str(name), keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`; CUDA states are matched by device index."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states, available = state["cuda"], torch.cuda.device_count()
    if cuda_states and len(cuda_states) != available:
        logger.warning("RNG state has %d CUDA device(s), this process sees %d", len(cuda_states), available)
    for index, cuda_state in enumerate(cuda_states[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), index)


def checkpoint_tmp_dir(run_dir: Path, step: int) -> Path:
    """The temp dir a save of ``step`` is written into (the same name on every rank)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"{TMP_PREFIX}step_{step}"


def prepare_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Create an empty :func:`checkpoint_tmp_dir` (removing one a crashed save left); call on one rank."""
    tmp = checkpoint_tmp_dir(run_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rank_rng(tmp: Path, rank: int) -> None:
    """Write this rank's RNG states into a checkpoint being saved."""
    torch.save(capture_rng_state(), tmp / rank_rng_file(rank))
    _fsync(tmp / rank_rng_file(rank))


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    scheduler_state: dict | None,
    trainer_state: dict[str, Any],
    config_text: str,
    keep_last: int,
    prepared: bool = False,
) -> Path:
    """Atomically write ``run_dir/checkpoints/step_{step}``, point ``latest`` at it and prune old ones.

    ``trainer_state`` must be JSON-serialisable. ``keep_last`` is how many complete checkpoints to keep
    (0 keeps all); the one ``latest`` names is never deleted. An existing ``step_{step}`` is replaced:
    it is moved aside just before the new one is renamed in, so a crash between those two renames
    falls back to an older checkpoint. ``prepared`` means other ranks already wrote their files into
    :func:`checkpoint_tmp_dir`; they become part of the checkpoint. Returns the checkpoint directory.
    """
    if step < 0 or keep_last < 0:
        raise ValueError(
            f"step and keep_last (0 keeps every checkpoint) must be >= 0, got {step}, {keep_last}"
        )
    trainer_json = json.dumps({"step": step, "trainer_state": trainer_state}, indent=2)  # fail early
    tensors, aliases = _storable_tensors(model_state)
    pickled = {
        RNG_FILE: capture_rng_state(),
        OPTIMIZER_FILE: optimizer_state,
        SCHEDULER_FILE: scheduler_state,
    }
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = f"step_{step}"
    tmp = checkpoint_tmp_dir(run_dir, step) if prepared else prepare_checkpoint_dir(run_dir, step)
    try:
        save_safetensors(
            tensors, tmp / MODEL_FILE, metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)}
        )
        _fsync(tmp / MODEL_FILE)
        for fname, obj in pickled.items():
            if obj is not None:
                torch.save(obj, tmp / fname)
                _fsync(tmp / fname)
        _write_synced(tmp / TRAINER_STATE_FILE, trainer_json)
        _write_synced(tmp / CONFIG_FILE, config_text)
        _mark_complete(tmp, step)
    except OSError as exc:
        written = folder_bytes(tmp) if tmp.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(root.parent if not root.exists() else root).free
            raise CheckpointError(
                f"no space left on device while saving {name}: {written / 2**30:.2f} GiB written before it "
                f"failed, {free / 2**30:.2f} GiB free after cleaning up; free space and resume from "
                f"{latest_checkpoint(run_dir) or 'the start'}"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    final = _publish(tmp, root, name)
    _prune(root, keep_last, protect=name)
    logger.info("saved checkpoint %s", final)
    return final


def _mark_complete(tmp: Path, step: int) -> None:
    """fsync every file in ``tmp`` (other ranks' shards too), then write ``COMPLETE``: the size and
    SHA-256 of each. Nothing is marked complete before it is on disk."""
    files = sorted(path for path in tmp.rglob("*") if path.is_file())
    for path in files:
        _fsync(path)
    sizes = {path.relative_to(tmp).as_posix(): path.stat().st_size for path in files}
    digests = {path.relative_to(tmp).as_posix(): file_sha256(path) for path in files}
    _write_synced(tmp / COMPLETE_FILE, json.dumps({"step": step, "files": sizes, "sha256": digests}))
    for folder in sorted({path.parent for path in files}, reverse=True):
        _fsync(folder)


def _publish(tmp: Path, root: Path, name: str) -> Path:
    """Rename the complete ``tmp`` to ``root/name`` (moving an existing one aside) and point ``latest`` at it."""
    final = root / name
    if final.exists():
        logger.warning("replacing existing checkpoint %s", final)
        _move_aside(final)
    os.rename(tmp, final)
    _fsync(root)
    _write_synced(root / f"{LATEST_FILE}.tmp", name + "\n")
    os.replace(root / f"{LATEST_FILE}.tmp", root / LATEST_FILE)
    _fsync(root)
    return final


def _files_read(ckpt_dir: Path, rank: int, with_model: bool) -> list[str]:
    """The files of a checkpoint that rank ``rank`` reads when it resumes (its own ZeRO shards included)."""
    names = [TRAINER_STATE_FILE, CONFIG_FILE, SCHEDULER_FILE, RNG_FILE, rank_rng_file(rank)]
    if with_model:
        names += [MODEL_FILE, OPTIMIZER_FILE]
    shards = ckpt_dir / SHARDS_DIR
    if shards.is_dir():
        own = (f"rank_{rank}_", "mp_rank_00_model_states")
        names += [f"{SHARDS_DIR}/{p.name}" for p in sorted(shards.iterdir()) if any(k in p.name for k in own)]
    return [name for name in names if (ckpt_dir / name).is_file()]


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def check_free_space(run_dir: Path, margin: float = 1.05) -> None:
    """Raise :class:`CheckpointError` before a save that cannot fit: the next checkpoint needs about the
    space of the last one, and the last one is pruned only after the new one is complete."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    last = latest_checkpoint(run_dir)
    if last is None:
        return
    sizes = json.loads((last / COMPLETE_FILE).read_text(encoding="utf-8"))["files"]  # recorded at save
    needed = sum(sizes.values()) * margin
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(
            f"no space left for the next checkpoint in {root}: it needs about {needed / 2**30:.2f} GiB "
            f"(the size of {last.name}), {free / 2**30:.2f} GiB are free; free space, lower "
            "train.keep_last, or move the run, then resume"
        )


def load_checkpoint(
    ckpt_dir: Path, map_location: str | torch.device = "cpu", *, rank: int = 0, with_model: bool = True
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`; tensors go to ``map_location`` (RNG stays on CPU).

    ``rank`` picks that rank's RNG file when the checkpoint has one per rank. ``with_model=False``
    skips the weights and the optimiser (``model_state`` is then ``{}``), for engines that restore
    them from their own shards. Raises :class:`CheckpointError` naming the directory if it is
    incomplete or a file cannot be read.
    """
    ckpt_dir = Path(ckpt_dir)
    problem = checkpoint_problem(ckpt_dir) or checksum_problem(
        ckpt_dir, _files_read(ckpt_dir, rank, with_model)
    )
    if problem is not None:
        raise CheckpointError(f"checkpoint {ckpt_dir} is unusable: {problem}; resume from another checkpoint")

    def read(fname: str, loader: Callable[[Path], Any]) -> Any:
        try:
            return loader(ckpt_dir / fname)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {ckpt_dir}: cannot read {fname}: {exc}") from exc

    def optional_pt(fname: str) -> Any:
        if not (ckpt_dir / fname).exists():  # saved with None
            return None
        return read(fname, lambda p: torch.load(p, map_location=map_location, weights_only=True))

    step, trainer_state = read(TRAINER_STATE_FILE, load_trainer_state)
    rng_file = rank_rng_file(rank) if (ckpt_dir / rank_rng_file(rank)).is_file() else RNG_FILE
    if rng_file == RNG_FILE and rank > 0:
        logger.warning("%s has no RNG state for rank %d; using rank 0's", ckpt_dir, rank)
    model_state = (
        read(MODEL_FILE, lambda p: load_model_state(p, str(torch.device(map_location)))) if with_model else {}
    )
    return Checkpoint(
        path=ckpt_dir,
        step=step,
        model_state=model_state,
        optimizer_state=optional_pt(OPTIMIZER_FILE) if with_model else None,
        scheduler_state=optional_pt(SCHEDULER_FILE),
        rng_state=read(rng_file, lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        trainer_state=trainer_state,
        config_text=read(CONFIG_FILE, lambda p: p.read_text(encoding="utf-8")),
    )


class TerminationFlag:
    """Records SIGTERM/SIGINT so the training loop can save a checkpoint and exit 0.

    The loop polls ``requested``; in multi-rank runs the ranks should agree on it (e.g. an all-reduce)
    before saving. A SIGINT while a stop is already pending raises KeyboardInterrupt, so an
    interactive user can still abort a hanging save.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum

    def restore(self) -> None:
        """Reinstall the handlers that were active before this flag was installed."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}


def install_termination_handler(
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> TerminationFlag:
    """Install handlers that set ``flag.requested`` on ``signals`` (main thread only).

    On SLURM, SIGTERM arrives on pre-emption or at the time limit, followed by SIGKILL after KillWait
    (30 s by default); ask for an earlier warning with ``#SBATCH --signal=TERM@300`` so the save fits.
    """
    return TerminationFlag(signals)


def _storable_tensors(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Make ``model_state`` acceptable to safetensors without copying the whole model.

    Exact aliases (tied weights) are stored once and returned as ``{alias: stored_name}``; tensors that
    overlap the bytes of one already kept are cloned; non-contiguous tensors are made contiguous.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    stored_as: dict[tuple, str] = {}  # exact view -> name it is stored under
    spans: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}  # storage -> byte ranges kept
    for name, value in model_state.items():
        tensor = value.detach()
        if not tensor.is_contiguous() or tensor.numel() == 0:
            tensors[name] = tensor.contiguous()
            continue
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        view = (tensor.device, start, tensor.dtype, tensor.shape)
        kept = spans.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), [])
        if view in stored_as:
            aliases[name] = stored_as[view]
        elif any(s < end and start < e for s, e in kept):
            tensors[name] = tensor.clone()
        else:
            stored_as[view] = name
            kept.append((start, end))
            tensors[name] = tensor
    return tensors, aliases


def _prune(root: Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``protect``), then every
    temp dir left by an interrupted save and every directory moved aside for deletion."""
    if keep_last > 0:
        for path in complete_checkpoints(root)[:-keep_last]:
            if path.name != protect:
                _move_aside(path)
                logger.info("pruned checkpoint %s", path)
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            try:
                shutil.rmtree(path)
            except OSError as exc:
                logger.warning("could not remove stale %s: %s", path, exc)


def _move_aside(path: Path) -> None:
    """Atomically rename ``path`` out of the ``step_N`` namespace; :func:`_prune` deletes it later."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}_{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)


def _write_synced(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it."""
    path.write_text(text, encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    """fsync a file or directory; directory fsync is skipped on filesystems that reject it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)
