"""Engines: how the one training loop runs on one process or many.

The loop talks only to this small interface (forward module, backward, clipping, optimiser step,
state for checkpoints, rank information), so no strategy has its own copy of the loop.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

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

    def clip_and_step(self, max_norm: float) -> float:
        """Clip gradients to ``max_norm`` (0 disables), step the optimiser, zero grads; return the pre-clip norm."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full model state dict for checkpoints (on the main process)."""
        return self.model.state_dict()

    def all_reduce_sum(self, value: float) -> float:
        """Sum a scalar over ranks."""
        return value

    def barrier(self) -> None:
        """Wait for every rank."""


class DDPEngine(Engine):
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

    def all_reduce_sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def barrier(self) -> None:
        dist.barrier()


def make_engine(
    name: str, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, world_size: int
) -> Engine:
    """Return the engine for ``name`` (``single`` or ``ddp``; ``single`` under torchrun with >1 process means ddp)."""
    if name == "single" and world_size > 1:
        name = "ddp"
    if name == "single":
        return Engine(model, optimizer, device)
    if name == "ddp":
        return DDPEngine(model, optimizer, device)
    raise ValueError(f"unknown engine {name!r}: use single or ddp")
