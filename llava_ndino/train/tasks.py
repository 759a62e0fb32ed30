"""Tasks: what the one loop trains. A task owns the model family, the data and the objective; the
loop owns optimisation, engines, checkpoints and logging.

A task's ``loss_sum`` returns a *summed* loss, the number of targets it sums over (label tokens,
preference pairs, ...) and summed extra statistics; the loop divides by the targets of the whole
optimiser step, so gradient accumulation and world size never change the objective.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Sampler

from llava_ndino.config import RunConfig
from llava_ndino.data.dataset import (
    Batch,
    Collator,
    EncodedDataset,
    JsonRecords,
    RecordSource,
    ResumableSampler,
    ShapesRecords,
)
from llava_ndino.data.encode import IGNORE_INDEX, ConversationEncoder
from llava_ndino.data.grouping import GroupedSampler, sample_lengths
from llava_ndino.data.lengths import LengthEstimator
from llava_ndino.data.mixture import map_style_mixture, mixture_parts
from llava_ndino.data.packing import model_inputs
from llava_ndino.data.shards import is_shard_dir
from llava_ndino.data.streaming import ShardStream
from llava_ndino.train.metrics import flops_per_step
from llava_ndino.train.model_setup import (
    apply_init_from,
    apply_trainable,
    build_model,
    param_groups,
    save_skeleton,
)
from llava_ndino.train.vision_sync import freeze_unused_vision_layers, install_vision_keepalive


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


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a label in any row of ``labels`` (sorted, 1-D).

    Passed as ``logits_to_keep``, they make the model compute logits only where the loss needs them.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


LOSS_CHUNK = 1024
"""Label positions per cross-entropy chunk when the loss is chunked (see :func:`token_loss_sum`)."""
LOSS_CHUNK_ABOVE = 4096
"""Chunk the loss only above this many label positions in a micro-batch: below it the fp32 copies are small."""


def shift_for_next_token(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (dtype kept) and the labels they predict: each position's next token, over every
    position or only ``positions`` (the logits were then computed there alone, with ``logits_to_keep``)."""
    if positions is None:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels[:, positions + 1]


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy computed ``chunk`` rows at a time, its gradient written during the forward.

    Each chunk is upcast to fp32, its loss summed and its gradient (softmax minus one-hot, zero on
    ignored rows) stored in the logits' dtype; the backward only scales that gradient. The fp32
    temporaries exist for one chunk at a time, and the logits need not be kept for the backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            rows = slice(start, start + chunk)
            log_probs = logits[rows].float().log_softmax(dim=-1)
            valid = (targets[rows] != IGNORE_INDEX).unsqueeze(1)
            index = targets[rows].clamp(min=0).unsqueeze(1)  # ignored rows point at 0, then are masked
            total -= (log_probs.gather(1, index) * valid).sum()
            probs = log_probs.exp_()
            probs.scatter_add_(1, index, -valid.to(probs.dtype))
            grad[rows] = probs.mul_(valid)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        """Scale the stored gradient in place (the graph is never run backward twice)."""
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``logits`` against ``labels`` (``-100`` ignored), in fp32.

    ``logits`` cover every position, or only ``positions`` (from :func:`label_positions`) when given.
    Above :data:`LOSS_CHUNK_ABOVE` positions the loss runs through :class:`ChunkedCrossEntropy` in
    chunks of :data:`LOSS_CHUNK`: instead of fp32 log-probabilities and two fp32 gradients for every
    position (12 bytes per logit, gigabytes at a 128k vocabulary), one gradient in the logits' dtype.
    """
    shifted, targets = shift_for_next_token(logits, labels, positions)
    flat, flat_targets = shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1)
    if flat.shape[0] <= LOSS_CHUNK_ABOVE or not flat.requires_grad:
        return _cross_entropy_sum(flat, flat_targets)
    return ChunkedCrossEntropy.apply(flat, flat_targets, LOSS_CHUNK)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens that carry loss after the next-token shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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

    def source(self, split: str = "train") -> RecordSource:
        """The record source the recipe asks for (synthetic shapes, a map-style mixture, a LLaVA JSON file)."""
        data = self.cfg.data
        if data.synthetic == "shapes":
            count = data.synthetic_train if split == "train" else data.synthetic_eval
            seed = self.cfg.seed if split == "train" else self.cfg.seed + 1_000_003
            return ShapesRecords(count, seed, data.synthetic_image_size, dialogues=split == "train")
        if data.mixture:
            return map_style_mixture(mixture_parts(data.mixture, data.root), data.root, self.cfg.seed)
        if not data.path:
            raise ValueError(
                "set data.path=FILE (LLaVA JSON/JSONL) or SHARD_DIR, data.mixture=STAGE or data.synthetic=shapes"
            )
        return JsonRecords(Path(data.path))

    def dataset(self, split: str = "train") -> Dataset:
        """Map-style data, or a :class:`ShardStream` when the data are webdataset shards."""
        data = self.cfg.data
        encoder = ConversationEncoder(
            self.processor, data.template, data.max_length, data.image_root, data.max_pixels
        )
        shards = None
        if data.synthetic is None and data.mixture:
            parts = mixture_parts(data.mixture, data.root)
            if all(is_shard_dir(path) for _, _, path in parts):
                shards = [(path, weight) for _, weight, path in parts]
        elif data.synthetic is None and data.path and is_shard_dir(Path(data.path)):
            shards = [(Path(data.path), 1.0)]
        if shards is not None:
            batch = self.cfg.train.per_device_batch_size
            return ShardStream(shards, encoder, self.cfg.seed, batch, data.shuffle_buffer)
        return EncodedDataset(self.source(split), encoder)

    def collator(self) -> Callable[[list], Batch]:
        data = self.cfg.data
        return Collator(self.processor.tokenizer.pad_token_id, data.packing, data.pack_length)

    def sampler(self, dataset: Dataset, start: int, rank: int, world_size: int) -> Sampler[int] | None:
        """Shuffled, or grouped by modality and length; None for a :class:`ShardStream`, which
        positions itself (streams shuffle in their buffer and are not length-grouped)."""
        data = self.cfg.data
        if isinstance(dataset, ShardStream):
            dataset.set_position(start, rank, world_size)
            return None
        if not data.group_by_length:
            return super().sampler(dataset, start, rank, world_size)
        estimator = LengthEstimator(
            self.processor, data.template, data.max_length, data.image_root, data.max_pixels
        )
        key = {
            "data": data.mixture or data.path or data.synthetic,
            "template": data.template,
            "max_length": data.max_length,
            "samples": len(dataset),
        }
        lengths, has_image = sample_lengths(
            dataset, estimator, Path(self.cfg.output_dir) / "data_lengths.json", key
        )
        return GroupedSampler(
            lengths,
            has_image,
            self.cfg.train.per_device_batch_size,
            self.cfg.seed,
            start=start,
            rank=rank,
            world_size=world_size,
            window=data.group_window,
        )

    def flops(self, batch: dict[str, torch.Tensor]) -> float:
        return flops_per_step(self.model, batch)


TASKS: dict[str, type[Task]] = {VlmSftTask.name: VlmSftTask}
"""Objective name -> task class; the text tasks (clm, sft, dpo) add themselves when imported below."""


def make_task(cfg: RunConfig) -> Task:
    """Return the task for ``cfg.objective``."""
    if cfg.objective not in TASKS:
        raise ValueError(f"unknown objective {cfg.objective!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.objective](cfg)


# The text tasks subclass Task, so they load last; importing the module (not names from it) keeps
# either import order working.
from llava_ndino.train import text_tasks  # noqa: E402, F401
