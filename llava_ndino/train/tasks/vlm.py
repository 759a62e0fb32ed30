"""The VLM task: LLaVA-NeXT supervised fine-tuning, which every LLaVA-NDiNO stage trains.

Image + conversation in, loss on the answers the template marks; the data come from
:mod:`llava_ndino.train.data_factory`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from llava_ndino.data.dataset import Batch, Collator
from llava_ndino.model.loading import apply_init_from, build_model, save_skeleton
from llava_ndino.train.data_factory import vlm_dataset, vlm_sampler
from llava_ndino.train.metrics import flops_per_step
from llava_ndino.train.parts import apply_trainable, param_groups
from llava_ndino.train.tasks.base import Task
from llava_ndino.train.vision_sync import freeze_unused_vision_layers, install_vision_keepalive


class VlmSftTask(Task):
    """LLaVA-NeXT supervised fine-tuning (every NDiNO stage): image + conversation, loss on answers."""

    name = "vlm_sft"

    def build(self) -> None:
        """Build the model, load ``init_from`` into it (full model, before any engine shards it), freeze."""
        self.model, self.processor = build_model(self.cfg.model, self.cfg.seed)
        apply_init_from(self.model, self.cfg)
        apply_trainable(self.model, list(self.cfg.train.trainable))

    def save_skeleton(self, run_dir: Path) -> None:
        save_skeleton(self.model, self.processor, run_dir)

    def param_groups(self) -> list[dict]:
        return param_groups(self.model, self.cfg.train)

    def prepare_parallel(self, world_size: int) -> None:
        """Freeze the tower layers LLaVA never reads; with several ranks, always run the vision path."""
        freeze_unused_vision_layers(self.model)
        if world_size > 1:
            install_vision_keepalive(self.model)

    def dataset(self, split: str = "train") -> Dataset:
        return vlm_dataset(self.cfg, self.processor, split)

    def collator(self) -> Callable[[list], Batch]:
        data = self.cfg.data
        return Collator(self.processor.tokenizer.pad_token_id, data.packing, data.pack_length)

    def sampler(self, dataset: Dataset, start: int, rank: int, world_size: int) -> Sampler[int] | None:
        return vlm_sampler(self.cfg, self.processor, dataset, start, rank, world_size)

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        return flops_per_step(self.model, batch)
