"""The task interface: what the one loop trains. A task owns the model family, the data and the
objective; the loop owns optimisation, engines, checkpoints and logging.

A task's ``loss_sum`` returns a *summed* loss, the number of targets it sums over (label tokens,
preference pairs, ...) and summed extra statistics; the loop divides by the targets of the whole
optimiser step, so gradient accumulation and world size never change the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from llava_ndino.config import RunConfig
from llava_ndino.data.dataset import (
    Batch,
    ResumableSampler,
)
from llava_ndino.data.packing import model_inputs
from llava_ndino.train.losses import count_label_tokens, label_positions, token_loss_sum


class Task:
    """Base class: build the model, the data set and its collator, and compute the objective."""

    name = "task"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model: nn.Module
        self.processor = None

    def build(self) -> None:
        """Create ``self.model`` (all parameters on CPU) and ``self.processor``; freeze per the recipe."""
        raise NotImplementedError

    def prepare_parallel(self, world_size: int) -> None:
        """Adjust the built model before the optimiser and the engine see it (``world_size`` processes)."""

    def save_skeleton(self, run_dir: Path) -> None:
        """Write what inference and export need besides the weights (config, tokenizer/processor)."""
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups (with their own lr/weight decay)."""
        raise NotImplementedError

    def checkpoint_state(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of the model state a checkpoint stores (all of it; adapter tasks keep only adapters)."""
        return model_state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`checkpoint_state` stored back into ``self.model``."""
        self.model.load_state_dict(state)

    def dataset(self, split: str = "train") -> Dataset:
        """The map-style data set for ``split``; items may be :class:`~llava_ndino.data.dataset.Skipped`."""
        raise NotImplementedError

    def collator(self) -> Callable[[list], Batch]:
        """Collate data-set items into a :class:`~llava_ndino.data.dataset.Batch`."""
        raise NotImplementedError

    def sampler(self, dataset: Dataset, start: int, rank: int, world_size: int) -> Sampler[int]:
        """The index stream, starting after ``start`` consumed samples (global count over ranks)."""
        return ResumableSampler(len(dataset), self.cfg.seed, start=start, rank=rank, world_size=world_size)

    def loss_sum(
        self, module: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the batch's targets, plus summed statistics to log (divided by targets).

        The default is next-token cross-entropy on the label tokens (every objective but DPO). The
        language-model head runs only at the positions that predict a label (see
        :func:`label_positions`): the logits are the largest activation of a long sequence with a
        128k vocabulary, and the prompt and image positions carry no loss.
        """
        positions = label_positions(batch["labels"])
        logits = module(**model_inputs(batch), use_cache=False, logits_to_keep=positions).logits
        return token_loss_sum(logits, batch["labels"], positions), {}

    def targets(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets ``loss_sum`` sums over for ``batch`` (by default, label tokens)."""
        return count_label_tokens(batch)

    def logit_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions (summed over rows) at which ``loss_sum`` computes logits: the label positions."""
        return batch["labels"].shape[0] * label_positions(batch["labels"]).numel()

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        """Model FLOPs of a forward+backward pass over ``batch`` (for MFU)."""
        raise NotImplementedError
