"""Modality-length grouped sampling, in the spirit of LLaVA's ``group_by_modality_length``.

Image and text-only samples never share a micro-batch, and samples of similar token length go
together: each epoch the samples of one modality are shuffled, cut into windows of
``window`` global batches, sorted by length inside each window and cut into global batches; the
batches of both modalities are then shuffled. The order is a function of (seed, epoch) only, so
the consumed-sample count still resumes exactly, as with
:class:`~llava_ndino.data.dataset.ResumableSampler`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from llava_ndino.data.dataset import EncodedDataset, ResumableSampler
from llava_ndino.data.lengths import LengthEstimator


class GroupedSampler(ResumableSampler):
    """Endless grouped index stream starting at a consumed count; rank ``r`` takes positions ``k % W == r``.

    ``lengths[i]`` is the token length of sample ``i`` and ``has_image[i]`` its modality. A global
    batch is ``batch_size * world_size`` consecutive positions, so every rank's micro-batch holds
    one modality and similar lengths.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        window: int = 64,
    ):
        super().__init__(len(lengths), seed, start=start, rank=rank, world_size=world_size)
        if len(has_image) != len(lengths):
            raise ValueError("lengths and has_image must describe the same samples")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.has_image = torch.as_tensor(list(has_image), dtype=torch.bool)
        self.global_batch = batch_size * world_size
        self.window = window

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        permutation = torch.randperm(self.size, generator=generator)
        batches: list[torch.Tensor] = []
        leftovers: list[torch.Tensor] = []
        for modality in (True, False):
            members = permutation[self.has_image[permutation] == modality]
            span = self.global_batch * self.window
            for begin in range(0, members.numel(), span):
                chunk = members[begin : begin + span]
                chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
                for cut in chunk.split(self.global_batch):
                    (batches if cut.numel() == self.global_batch else leftovers).append(cut)
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        order = torch.cat(shuffled + leftovers).tolist()
        # when the epoch starts mid-batch, its first `head` samples complete the previous epoch's last
        # batch: move that many leftovers to the front so that the grouped batches stay aligned
        head = (-epoch * self.size) % self.global_batch
        return order[len(order) - head :] + order[: len(order) - head] if head else order


def sample_lengths(
    dataset: EncodedDataset, estimator: LengthEstimator, cache: Path, key: dict
) -> tuple[list[int], list[bool]]:
    """Token lengths (capped at max_length) and modalities of every sample, cached in ``cache``.

    Measuring reads every image header once; a resumed run with the same ``key`` (data, template,
    max_length, size) reads the cache instead. Rejected samples count as their (zero) length.
    """
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return stored["lengths"], stored["has_image"]
    measures = dataset.measures(estimator)
    lengths = [min(m.length, estimator.max_length) for m in measures]
    has_image = [m.has_image for m in measures]
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps({"key": key, "lengths": lengths, "has_image": has_image}), encoding="utf-8")
    partial.replace(cache)
    return lengths, has_image
