"""Streaming training data from webdataset shards: per-rank and per-worker splits, a shuffle buffer,
weighted sampling across data sets, and exact resume from the consumed-sample count.

Every loader worker of every rank owns a *slot* (``rank * workers + worker``) and reads only the
shards ``shards[slot::slots]`` of each data set, in an order reshuffled each pass. Its sample stream
is a pure function of (seed, slot) and the indexed shard sizes: a weighted choice of data set per
sample (the mixture weights) and a per-data-set shuffle buffer over sample *references*, all from
seeded generators; a sample is read (by its tar offset) only when it is used. The DataLoader takes
micro-batch ``j`` of a rank from worker ``j % workers``, so from the global consumed count a
resumed loader knows which stream each worker continues and how far: it skips that many
references without reading any file, and continues with the very samples the interrupted run
would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.dataset import Skipped, encode_or_skip
from llava_ndino.data.encode import ConversationEncoder, EncodedSample
from llava_ndino.data.images import ImageBytes
from llava_ndino.data.shards import shard_files

Ref = tuple[int, int, int]
"""A sample reference: (data set, shard, sample within the shard)."""


def _passes(dataset: int, shards: list[int], counts: list[int], seed: str) -> Iterator[Ref]:
    """Endless passes over ``shards`` (each pass in a new seeded order), as sample references."""
    for epoch in range(1_000_000_000):
        order = list(shards)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for shard in order:
            for sample in range(counts[shard]):
                yield dataset, shard, sample


def _shuffled(stream: Iterator[Ref], size: int, rng: random.Random) -> Iterator[Ref]:
    """A shuffle buffer of ``size`` references over an endless ``stream``."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = rng.randrange(size)
        yield buffer[pick]
        buffer[pick] = item


class ShardStream(IterableDataset):
    """Endless stream of encoded samples (or :class:`Skipped`) from one or more shard folders."""

    def __init__(
        self,
        folders: list[tuple[Path, float]],
        encoder: ConversationEncoder,
        seed: int,
        batch_size: int,
        shuffle_buffer: int = 1000,
    ):
        self.folders = [(Path(folder), weight) for folder, weight in folders]
        self.files = [shard_files(folder) for folder, _ in self.folders]
        self.samples = sum(file.expected for files in self.files for file in files)
        self.encoder, self.seed, self.batch_size = encoder, seed, batch_size
        self.shuffle_buffer = shuffle_buffer
        self.start, self.rank, self.world_size = 0, 0, 1

    def __len__(self) -> int:
        return self.samples

    def set_position(self, start: int, rank: int, world_size: int) -> None:
        """Begin after ``start`` samples consumed over all ranks; this process is ``rank`` of ``world_size``."""
        self.start, self.rank, self.world_size = start, rank, world_size

    def references(self, slot: int, slots: int) -> Iterator[Ref]:
        """The endless, deterministic stream of one slot as sample references: it depends only on the
        indexed sample counts, so skipping ahead reads no file."""
        streams, weights = [], []
        for k, ((folder, weight), files) in enumerate(zip(self.folders, self.files, strict=True)):
            mine = list(range(slot, len(files), slots))
            if not mine:
                raise ValueError(
                    f"{folder} has {len(files)} shards, fewer than ranks x loader workers = {slots}; "
                    "reshard it with a smaller --samples-per-shard or lower data.num_workers"
                )
            counts = [file.expected for file in files]
            rng = random.Random(f"{self.seed}:buffer:{k}:{slot}")
            buffer = min(self.shuffle_buffer, sum(counts[i] for i in mine))  # at most one pass
            streams.append(_shuffled(_passes(k, mine, counts, f"{self.seed}:{k}:{slot}"), buffer, rng))
            weights.append(weight)
        choose = random.Random(f"{self.seed}:mixture:{slot}")
        while True:
            yield next(streams[choose.choices(range(len(streams)), weights)[0]])

    def raw_stream(
        self, slot: int, slots: int, skip: int = 0
    ) -> Iterator[tuple[dict | SampleError, list[ImageBytes]]]:
        """The slot's samples, (record, encoded images), after skipping ``skip`` without reading them;
        a malformed sample comes as (its :class:`SampleError`, [])."""
        references = self.references(slot, slots)
        for _ in range(skip):
            next(references)
        for k, shard, sample in references:
            try:
                yield self.files[k][shard].get(sample)
            except SampleError as err:  # a malformed sample: skipped and listed like any other
                yield err, []

    def __iter__(self) -> Iterator[EncodedSample | Skipped]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches_done = self.start // self.world_size // self.batch_size
        # a fresh DataLoader asks worker 0 first: it continues the stream whose turn is next
        worker = (loader_worker + batches_done) % workers
        slot, slots = self.rank * workers + worker, self.world_size * workers
        done = max(0, -(-(batches_done - worker) // workers)) * self.batch_size
        for position, (record, images) in enumerate(self.raw_stream(slot, slots, done), start=done):
            if isinstance(record, SampleError):
                yield Skipped(record.sample_id, record.reason, str(record))
            else:
                yield encode_or_skip(self.encoder, record, position, images)
