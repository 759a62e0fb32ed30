"""Engines: how the one training loop runs on one process or many.

The loop talks only to this small interface (forward module, backward, clipping, optimiser step,
state for checkpoints, rank information), so no strategy has its own copy of the loop:

* ``single``: one process;
* ``ddp``: torch DistributedDataParallel;
* ``zero2``, ``zero2_offload``, ``zero3``, ``zero3_offload``: DeepSpeed ZeRO with the configs in
  ``launch/deepspeed/`` (the package's ``ds_configs/``), or a user JSON via ``train.deepspeed_config``.

Every engine takes the loss already divided by the targets of the whole optimiser step (times the
world size, which data-parallel averaging divides out again), and the loop runs the same number
of forward/backward passes on every rank, so collectives always match.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llava_ndino.config import ENGINES
from llava_ndino.formats.run_dir import SHARDS_DIR

log = logging.getLogger(__name__)


def init_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed from torchrun's environment; return (rank, local_rank, world_size)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend, timeout=timedelta(minutes=int(os.environ.get("NDINO_DIST_TIMEOUT_MIN", "30")))
        )
    return rank, local_rank, world_size


class Engine:
    """Single-process engine; :class:`DDPEngine` extends it for data parallelism."""

    name = "single"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.model = model.to(device)
        self.optimizer = optimizer
        self.device = device
        self.rank, self.world_size = 0, 1

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes files."""
        return self.rank == 0

    @property
    def module(self) -> nn.Module:
        """The module to call for forward passes."""
        return self.model

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss``."""
        loss.backward()

    def clip_and_step(self, max_norm: float, skip: bool = False) -> float:
        """Clip gradients to ``max_norm`` (0 disables), step the optimiser, zero grads; return the pre-clip norm.

        The step is skipped (gradients dropped, weights untouched) when ``skip`` is set or the norm is
        not finite, so a NaN or Inf never reaches the weights or the optimiser state.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
        if not skip and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def skips_nonfinite_steps(self) -> bool:
        """True when :meth:`clip_and_step` can drop a non-finite step before it reaches the weights."""
        return True

    def micro_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; ``last`` marks the step's final one."""
        return contextlib.nullcontext()

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full model state dict for checkpoints (on the main process; other ranks may get ``{}``).

        Every rank must call it: sharded engines gather parameters collectively.
        """
        return self.model.state_dict()

    def optimizer_state(self) -> dict | None:
        """Optimiser state for ``optimizer.pt``; None when the engine saves it in shards."""
        return self.optimizer.state_dict()

    def save_shards(self, directory: Path) -> None:
        """Write this rank's share of a sharded checkpoint into ``directory`` (collective; no-op here)."""

    @property
    def reads_shards(self) -> bool:
        """True when resuming reads this engine's shards (:meth:`load_shards`) instead of ``model.safetensors``."""
        return False

    def load_shards(self, checkpoint: Path) -> None:
        """Restore weights and optimiser state from the shards :meth:`save_shards` wrote (collective)."""
        raise NotImplementedError(f"engine {self.name} keeps no shards")

    def all_reduce_sum(self, value: float) -> float:
        """Sum a scalar over ranks."""
        return value

    def barrier(self) -> None:
        """Wait for every rank."""


class DistributedEngine(Engine):
    """Collectives shared by the multi-process engines."""

    def all_reduce_sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def barrier(self) -> None:
        dist.barrier()


class DDPEngine(DistributedEngine):
    """torch DistributedDataParallel over gloo (CPU) or NCCL (GPU)."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        super().__init__(model, optimizer, device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.wrapped = nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )

    @property
    def module(self) -> nn.Module:
        return self.wrapped

    def micro_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on every micro-batch but the step's last one."""
        return contextlib.nullcontext() if last else self.wrapped.no_sync()


def resolve_batch(per_device: int, grad_accum: int, global_batch: int, world_size: int) -> tuple[int, int]:
    """Return the (per-device batch, accumulation) to run with on ``world_size`` processes.

    ``global_batch`` 0 keeps the recipe's per-device batch and accumulation. Otherwise the global
    batch is fixed: accumulation becomes ``global / (world x per-device)``, and when the world alone
    already exceeds that, accumulation is 1 and the per-device batch shrinks to ``global / world``.
    """
    if global_batch <= 0:
        return per_device, grad_accum
    if global_batch % world_size:
        raise ValueError(
            f"train.global_batch_size={global_batch} is not divisible by the {world_size} processes; "
            "pick a multiple of the GPU count or set train.global_batch_size=0"
        )
    per_rank = global_batch // world_size
    if per_rank <= per_device:
        return per_rank, 1
    if per_rank % per_device:
        raise ValueError(
            f"train.global_batch_size={global_batch} gives {per_rank} samples per process, not a multiple "
            f"of train.per_device_batch_size={per_device}; choose a per-device batch that divides {per_rank}"
        )
    return per_device, per_rank // per_device


ZERO_ENGINES = tuple(name for name in ENGINES if name.startswith("zero"))
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def deepspeed_config(
    name: str, path: str | None, micro_batch: int, grad_accum: int, max_grad_norm: float
) -> dict:
    """Read the DeepSpeed JSON for engine ``name`` (or ``path``) and fill its ``"auto"`` values from the recipe."""
    source = Path(path) if path else DS_CONFIG_DIR / f"{name}.json"
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read DeepSpeed config {source}: {exc}") from exc
    auto = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = torch.cuda.is_available()
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ValueError(f"{source}: zero_optimization.stage must be 2 or 3, got {stage!r}")
    return config


class DeepSpeedEngine(DistributedEngine):
    """DeepSpeed ZeRO-2/3 (optionally offloading to CPU) around the recipe's optimiser.

    Checkpoints keep DeepSpeed's partitioned model and optimiser states under ``zero/`` (one file per
    rank, written by every rank at once) next to a consolidated ``model.safetensors``, which ZeRO-3
    gathers one module at a time so the host never holds more than one full copy.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        config: dict,
    ):
        import deepspeed

        # a single process still needs a process group for DeepSpeed; it stays for later runs in this
        # process, since DeepSpeed caches its groups globally
        if not dist.is_initialized():
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        self.name = name
        self.model = model.to(device)
        self.device = device
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.stage = config["zero_optimization"]["stage"]
        # DeepSpeed calls torch's deprecated collective names on every step; keep the log readable
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=config
        )
        log.info("DeepSpeed ZeRO-%d%s", self.stage, " with CPU offload" if "offload" in name else "")

    @property
    def module(self) -> nn.Module:
        return self.ds

    @property
    def reads_shards(self) -> bool:
        return True

    def micro_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Tell DeepSpeed which backward closes the step, so it reduces gradients and steps once."""
        self.ds.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    @property
    def skips_nonfinite_steps(self) -> bool:
        """DeepSpeed steps inside ``ds.step()`` (fp32 and bf16 have no overflow skip), so a non-finite
        step has already reached the weights when it is seen: the loop stops the run instead."""
        return False

    def clip_and_step(self, max_norm: float, skip: bool = False) -> float:
        """DeepSpeed clips (``gradient_clipping``), steps and zeroes; returns its pre-clip global norm."""
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def model_state(self) -> dict[str, torch.Tensor]:
        if self.stage < 3:
            return self.model.state_dict() if self.is_main else {}
        copies = dict(self._gathered_copies())
        if not self.is_main:
            return {}
        return {
            key: copies[id(value)] if id(value) in copies else value.detach()
            for key, value in self.model.state_dict(keep_vars=True).items()
        }

    def _gathered_copies(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (id(param), full CPU copy) for every parameter, gathering one module's at a time (rank 0 keeps them)."""
        import deepspeed

        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            if not params:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.is_main:
                    for param in params:
                        yield id(param), param.detach().to("cpu", copy=True)

    def optimizer_state(self) -> dict | None:
        return None

    def save_shards(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=SHARDS_DIR, client_state={}, save_latest=False)

    def load_shards(self, checkpoint: Path) -> None:
        if not (checkpoint / SHARDS_DIR).is_dir():
            raise ValueError(
                f"{checkpoint} has no {SHARDS_DIR}/ DeepSpeed shards: it was written by another engine; "
                f"resume it with that engine, or start a new run with init_from={checkpoint}"
            )
        self.ds.checkpoint_engine.load = _weights_only_load  # DeepSpeed's own load unpickles anything
        path, _ = self.ds.load_checkpoint(
            str(checkpoint), tag=SHARDS_DIR, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise ValueError(f"DeepSpeed could not load the shards in {checkpoint / SHARDS_DIR}")


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO-2/3 shards hold (loss scaler, stage enum, fragment map)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    """Read a DeepSpeed shard with torch's weights-only unpickler plus :func:`_deepspeed_safe_globals`;
    any other object in the file (a pickled payload) refuses the checkpoint instead of running."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(exc))
        what = f"it asks for {found.group(1)}" if found else "it holds objects of unknown types"
        raise ValueError(
            f"refusing checkpoint shard {path}: {what}, where only tensors and DeepSpeed's state belong; "
            "it was not written by this trainer, or was tampered with"
        ) from None


def engine_name(name: str, world_size: int) -> str:
    """The engine that runs: ``single`` with several processes means ``ddp``, ``ddp`` with one means ``single``."""
    if name == "single" and world_size > 1:
        return "ddp"
    if name == "ddp" and world_size == 1:
        return "single"
    return name


def check_resumable(checkpoint: Path, saved: tuple[str | None, int | None], current: tuple[str, int]) -> None:
    """Refuse a resume that cannot restore the optimiser: ZeRO shards belong to the engine and world
    size that wrote them, and a ZeRO checkpoint holds no ``optimizer.pt`` for the other engines.

    ``saved`` and ``current`` are ``(engine, world size)``; a checkpoint from before engines were
    recorded has ``(None, None)`` and counts as a full-state (single/ddp) one.
    """
    if saved[0] not in ZERO_ENGINES and current[0] not in ZERO_ENGINES:
        return  # full model and optimiser state: any world size and either of single/ddp resume it
    if saved != current:
        raise ValueError(
            f"{checkpoint} holds the state of {saved[0] or 'single/ddp'} on {saved[1] or 'unknown'} processes, "
            f"but this run is {current[0]} on {current[1]}; resume with the same engine and process count, "
            f"or start a new run (another output_dir) from its weights with init_from={checkpoint}"
        )


def make_engine(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    world_size: int,
    ds_config: dict | None = None,
) -> Engine:
    """Return the engine ``name`` (``single`` under torchrun with more than one process means ``ddp``).

    ZeRO engines need ``ds_config`` from :func:`deepspeed_config`.
    """
    name = engine_name(name, world_size)
    if name == "single":
        return Engine(model, optimizer, device)
    if name == "ddp":
        return DDPEngine(model, optimizer, device)
    if name in ZERO_ENGINES:
        if ds_config is None:
            raise ValueError(f"engine {name} needs a DeepSpeed config")
        return DeepSpeedEngine(name, model, optimizer, device, ds_config)
    raise ValueError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
