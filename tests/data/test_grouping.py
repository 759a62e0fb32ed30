"""Modality-length grouping (``data.grouping``): batches of one modality and similar lengths, far less
padding than random batches, exact resume and rank split."""

from __future__ import annotations

from itertools import islice

import torch

from llava_ndino.data.grouping import GroupedSampler


def test_grouped_sampler_groups_modalities_and_lengths_and_resumes() -> None:
    gen = torch.Generator().manual_seed(0)
    size, batch = 200, 4
    lengths = torch.randint(20, 2000, (size,), generator=gen).tolist()
    has_image = [i % 3 != 0 for i in range(size)]
    sampler = GroupedSampler(lengths, has_image, batch, seed=5, window=8)
    order = list(islice(iter(sampler), 2 * size))
    assert sorted(order[:size]) == list(range(size)) and sorted(order[size:]) == list(range(size))
    batches = [order[i : i + batch] for i in range(0, size - size % batch, batch)]
    mixed = sum(len({has_image[i] for i in b}) > 1 for b in batches)
    assert mixed <= 1, "only the leftover batch may mix modalities"

    def pad_fraction(groups):
        real = sum(lengths[i] for g in groups for i in g)
        return 1 - real / sum(max(lengths[i] for i in g) * len(g) for g in groups)

    shuffled = torch.randperm(size, generator=gen).tolist()
    random_batches = [shuffled[i : i + batch] for i in range(0, size, batch)]
    assert pad_fraction(batches) < pad_fraction(random_batches) / 3
    odd = GroupedSampler(lengths[:198], has_image[:198], batch, seed=5, window=8)
    stream = list(islice(iter(odd), 4 * 198))
    aligned = [stream[i : i + batch] for i in range(0, len(stream) - batch, batch)]
    assert sum(len({has_image[i] for i in b}) > 1 for b in aligned) <= 8, (
        "epochs starting mid-batch stay grouped"
    )
    resumed = list(islice(iter(GroupedSampler(lengths, has_image, batch, seed=5, start=37, window=8)), 100))
    assert resumed == order[37:137]
    two = [
        list(islice(iter(GroupedSampler(lengths, has_image, 2, 5, rank=r, world_size=2, window=8)), 50))
        for r in range(2)
    ]
    assert two[0] == order[0:100:2] and two[1] == order[1:100:2]
