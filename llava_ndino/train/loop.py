"""The one training loop: every stage and objective, every engine, exact resume, pre-emption.

Loss is summed over label tokens and divided by the label-token count of the whole optimiser step
(all micro-batches, all ranks), so gradient accumulation and padding never change the objective.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from llava_ndino.config import RunConfig, config_to_yaml, save_resolved_config
from llava_ndino.data.dataset import Batch
from llava_ndino.formats.run_dir import (
    TRAIN_LOG_FILE,
    resolve_resume,
)
from llava_ndino.train.checkpoint import (
    checkpoint_tmp_dir,
    install_termination_handler,
    load_checkpoint,
    prepare_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
    save_rank_rng,
)
from llava_ndino.train.engine import (
    ZERO_ENGINES,
    Engine,
    deepspeed_config,
    init_distributed,
    make_engine,
    resolve_batch,
)
from llava_ndino.train.metrics import MetricsLogger, Window
from llava_ndino.train.optim import make_optimizer
from llava_ndino.train.resume_rules import record_changes
from llava_ndino.train.run_lock import RunLock
from llava_ndino.train.setup import (
    agree_on_free_space,
    check_start,
    enable_gradient_checkpointing,
    ignore_termination_signals,
    make_scheduler,
    nonfinite_parameters,
    resolve_max_steps,
)
from llava_ndino.train.skips import SkipTracker
from llava_ndino.train.tasks.base import Task
from llava_ndino.train.tasks.registry import make_task

log = logging.getLogger(__name__)
MAX_EMPTY_BATCHES_IN_A_ROW = 1000
"""Micro-batches without a usable sample after which the run stops, whatever data.max_skip_ratio allows."""


@dataclass
class TrainResult:
    """What a finished (or pre-empted) run reports."""

    run_dir: Path
    step: int
    status: str
    last_loss: float | None


@dataclass
class Run:
    """The parts of a run the loop and the checkpoint writer share."""

    cfg: RunConfig
    task: Task
    engine: Engine
    scheduler: object
    skips: SkipTracker
    run_dir: Path
    accum: int
    max_steps: int
    """train.max_steps, or the step count train.epochs gives for this data set and global batch."""


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _setup_logging(run_dir: Path, is_main: bool) -> logging.Handler | None:
    """Send the package's log to ``run_dir/train.log`` on the main process; quiet the others."""
    package = logging.getLogger("llava_ndino")
    if not is_main:
        package.setLevel(logging.WARNING)
        return None
    handler = logging.FileHandler(run_dir / TRAIN_LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    return handler


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the training described by ``cfg``; returns when done or pre-empted."""
    rank, local_rank, world_size = init_distributed()
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    if rank == 0:
        lock.acquire()  # before anything in the run directory is written
    handler = _setup_logging(run_dir, rank == 0)
    threads = torch.get_num_threads()
    if cfg.train.cpu_threads > 0:
        torch.set_num_threads(cfg.train.cpu_threads)
    try:
        return _train(cfg, run_dir, rank, local_rank, world_size)
    finally:
        lock.release()
        torch.set_num_threads(threads)
        if handler is not None:
            logging.getLogger("llava_ndino").removeHandler(handler)
            handler.close()


def _train(cfg: RunConfig, run_dir: Path, rank: int, local_rank: int, world_size: int) -> TrainResult:
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    per_device, accum = resolve_batch(
        cfg.train.per_device_batch_size, cfg.train.grad_accum, cfg.train.global_batch_size, world_size
    )
    checkpoint = resolve_resume(cfg.resume, run_dir)
    changes = check_start(cfg, run_dir, checkpoint, world_size)  # before anything is built or written
    task = make_task(cfg)
    task.build()
    task.prepare_parallel(world_size)
    model = task.model
    if rank == 0:
        save_resolved_config(cfg, run_dir)
        task.save_skeleton(run_dir)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    dataset = task.dataset("train")
    max_steps = resolve_max_steps(
        cfg.train.max_steps, cfg.train.epochs, len(dataset), per_device * accum * world_size
    )
    optimizer = make_optimizer(cfg.train.optimizer, task.param_groups())
    scheduler = make_scheduler(cfg, optimizer, max_steps)
    ds_config = None
    if cfg.engine in ZERO_ENGINES:
        ds_config = deepspeed_config(
            cfg.engine, cfg.train.deepspeed_config, per_device, accum, cfg.train.max_grad_norm
        )
    engine = make_engine(cfg.engine, model, optimizer, device, world_size, ds_config)
    skips = SkipTracker(run_dir, cfg.data.max_skip_ratio, len(dataset), engine.is_main)

    step, consumed = 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, rank=rank, with_model=not engine.reads_shards)
        if engine.reads_shards:
            engine.load_shards(checkpoint)
        else:
            task.load_state(state.model_state)
            optimizer.load_state_dict(state.optimizer_state)
        scheduler.load_state_dict(state.scheduler_state)
        step, consumed = state.step, state.trainer_state["consumed"]
        skips.load(state.trainer_state["skips"])
        restore_rng_state(state.rng_state)
        log.info("resumed from %s at step %d (%d samples consumed)", checkpoint, step, consumed)
        if engine.is_main:
            record_changes(run_dir, step, changes)

    fixed = "global batch fixed by the recipe" if cfg.train.global_batch_size else "per-device batch fixed"
    log.info(
        "engine %s on %s; global batch %d = %d per device x %d accumulation x %d processes (%s)",
        engine.name,
        device,
        per_device * accum * world_size,
        per_device,
        accum,
        world_size,
        fixed,
    )
    sampler = task.sampler(dataset, consumed, rank, world_size)
    loader = DataLoader(
        dataset,
        batch_size=per_device,
        sampler=sampler,
        collate_fn=task.collator(),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        # its own generator: starting the loader must not draw from the restored global RNG
        generator=torch.Generator().manual_seed(cfg.seed + rank),
        worker_init_fn=ignore_termination_signals,
    )
    if checkpoint is None:
        skips.truncate()  # rows of an attempt that crashed before its first checkpoint
    metrics = MetricsLogger(run_dir, enabled=engine.is_main, start=step)
    termination = install_termination_handler()
    try:
        run = Run(cfg, task, engine, scheduler, skips, run_dir, accum, max_steps)
        result = _loop(run, iter(loader), metrics, termination, step, consumed)
    finally:
        termination.restore()
        metrics.close()
    return result


def _save(run: Run, step: int, consumed: int) -> None:
    """Every rank writes its shards and RNG state into the temp dir, then rank 0 completes the save.

    Weights that are not all finite are never saved, so the last checkpoint kept is always usable.
    """
    engine, run_dir = run.engine, run.run_dir
    bad = engine.all_reduce_sum(float(nonfinite_parameters(engine.model)))
    if bad:
        raise FloatingPointError(
            f"step {step}: {int(bad)} parameter tensor(s) hold NaN or Inf; not saving them over the last "
            "good checkpoint: resume from it (a lower train.lr usually helps)"
        )
    agree_on_free_space(engine, run_dir)
    if engine.is_main:
        prepare_checkpoint_dir(run_dir, step)
    engine.barrier()
    tmp = checkpoint_tmp_dir(run_dir, step)
    engine.save_shards(tmp)
    if engine.world_size > 1:
        save_rank_rng(tmp, engine.rank)
    state = run.task.checkpoint_state(engine.model_state())
    engine.barrier()
    if engine.is_main:
        save_checkpoint(
            run_dir,
            step,
            model_state=state,
            optimizer_state=engine.optimizer_state(),
            scheduler_state=run.scheduler.state_dict(),
            trainer_state={
                "consumed": consumed,
                "skips": run.skips.state(),
                "engine": engine.name,
                "world_size": engine.world_size,
                "max_steps": run.max_steps,
            },
            config_text=config_to_yaml(run.cfg),
            keep_last=run.cfg.train.keep_last,
            prepared=True,
        )
    engine.barrier()


def _next_batch(run: Run, batches) -> tuple[Batch, int]:
    """The next micro-batch with at least one usable sample, and how many raw samples it consumed.

    An all-skipped micro-batch is replaced by the next one, so every rank runs the same number of
    forward and backward passes and the collectives inside them stay matched.
    """
    consumed = 0
    for _ in range(MAX_EMPTY_BATCHES_IN_A_ROW):
        batch = next(batches)
        run.skips.update(batch)
        consumed += batch.num_raw * run.engine.world_size
        if not batch.empty:
            return batch, consumed
    raise RuntimeError(
        f"{MAX_EMPTY_BATCHES_IN_A_ROW} micro-batches in a row held no usable sample ({dict(run.skips.reasons)}); "
        f"see {run.skips.path} and fix the data"
    )


MAX_NONFINITE_IN_A_ROW = 5
"""Non-finite steps (NaN or Inf loss or gradient norm) in a row after which the run stops."""


def _count_nonfinite(run: Run, step: int, loss: float, grad_norm: float, in_a_row: int) -> int:
    """Count a step whose loss or gradient norm is not finite (0 when it is), and stop the run when the
    weights took it (an engine that cannot skip) or when too many came in a row."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return 0
    in_a_row += 1
    if not run.engine.skips_nonfinite_steps:
        raise FloatingPointError(
            f"step {step}: loss {loss}, gradient norm {grad_norm}; engine {run.engine.name} has applied it, so "
            "the run stops before saving: resume from the last checkpoint (a lower train.lr, or skipping the "
            "bad data, usually helps)"
        )
    log.warning(
        "step %d: loss %s, gradient norm %s: step skipped (%d in a row)", step, loss, grad_norm, in_a_row
    )
    if in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise FloatingPointError(
            f"{in_a_row} steps in a row had a non-finite loss or gradient norm (last: step {step}); the run "
            "stops without saving: check the data and train.lr, then resume from the last checkpoint"
        )
    return in_a_row


def _loop(run: Run, batches, metrics: MetricsLogger, termination, step: int, consumed: int) -> TrainResult:
    cfg, task, engine, scheduler = run.cfg, run.task, run.engine, run.scheduler
    train_cfg, max_steps = cfg.train, run.max_steps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if engine.device.type == "cuda" else nullcontext()
    window, last_loss, nonfinite = Window(), None, 0
    engine.model.train()
    bar = tqdm(
        total=max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not engine.is_main,
        dynamic_ncols=True,
    )
    while step < max_steps:
        micro = []
        for _ in range(run.accum):
            batch, raw = _next_batch(run, batches)
            consumed += raw
            micro.append(_to_device(batch.tensors, engine.device))
        local_targets, step_losses = sum(task.targets(b) for b in micro), []
        step_targets = max(engine.all_reduce_sum(local_targets), 1)
        for index, batch in enumerate(micro):
            with engine.micro_context(last=index == len(micro) - 1):
                with autocast:
                    loss_sum, stats = task.loss_sum(engine.module, batch)
                engine.backward(loss_sum * engine.world_size / step_targets)
            step_losses.append(float(loss_sum.detach()))  # one host sync per micro-batch, used twice
            window.sums.update({"loss": step_losses[-1], **{f"stat/{k}": v for k, v in stats.items()}})
            window.add_batch(batch, task.flops(batch), task.logit_tokens(batch))
        window.sums["targets"] += local_targets
        window.steps += 1
        step_loss = engine.all_reduce_sum(sum(step_losses))
        grad_norm = engine.clip_and_step(train_cfg.max_grad_norm, skip=not math.isfinite(step_loss))
        scheduler.step()
        step += 1
        nonfinite = _count_nonfinite(run, step, step_loss, grad_norm, nonfinite)
        window.sums["nonfinite_steps"] += nonfinite > 0
        bar.update(1)
        if step % train_cfg.log_every == 0 or step == max_steps:
            values = {
                **window.values(engine),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": round(grad_norm, 6),
            }
            metrics.log(step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
            last_loss = values["loss"]
            window.reset()
        if engine.all_reduce_sum(float(termination.requested)) > 0:
            log.warning("termination signal received: saving step %d and exiting", step)
            _save(run, step, consumed)
            bar.close()
            return TrainResult(run.run_dir, step, "preempted", last_loss)
        if step % train_cfg.save_every == 0 or (step == max_steps and train_cfg.save_last):
            _save(run, step, consumed)
    bar.close()
    return TrainResult(run.run_dir, step, "completed", last_loss)
