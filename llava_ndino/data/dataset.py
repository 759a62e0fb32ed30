"""Training data: record sources (LLaVA JSON/JSONL, synthetic shapes), encoding in loader workers,
a resumable shuffled sampler, and a collator that drops and reports bad samples.

The data position is the number of samples consumed; a resumed run rebuilds the sampler at that
position and sees exactly the samples it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from llava_ndino.data.conversation import SampleError
from llava_ndino.data.encode import ConversationEncoder, EncodedSample, collate
from llava_ndino.data.lengths import LengthEstimator, Measure
from llava_ndino.data.packing import pack


def read_records(path: Path) -> list[dict]:
    """Read a LLaVA JSON list or a JSONL file; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; set data.path=FILE")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{lineno}: invalid JSON ({err.msg}); fix or delete that line"
                    ) from err
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of samples (LLaVA format) or a .jsonl file")
    return records


class RecordSource:
    """Random access to raw samples: ``get(i)`` returns (record, in-memory images or None)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, index: int) -> tuple[dict, list[Image.Image] | None]:
        """Return record ``index`` and its images when they are not files on disk."""
        raise NotImplementedError


class JsonRecords(RecordSource):
    """Samples from a LLaVA JSON/JSONL file; images are read by the encoder from ``data.image_root``."""

    def __init__(self, path: Path):
        self.records = read_records(path)

    def __len__(self) -> int:
        return len(self.records)

    def get(self, index: int) -> tuple[dict, None]:
        return self.records[index], None


@dataclass
class Skipped:
    """A sample the encoder rejected, with its id, reason code and message."""

    sample_id: str
    reason: str
    message: str


def encode_or_skip(
    encoder: ConversationEncoder, record: dict, index: int, images=None
) -> EncodedSample | Skipped:
    """Encode one sample, turning any failure into :class:`Skipped` (a bad sample never ends a run;
    ``data.max_skip_ratio`` bounds how many may fail)."""
    try:
        return encoder.encode(record, index, images=images)
    except SampleError as err:
        return Skipped(err.sample_id, err.reason, str(err))
    except Exception as err:  # noqa: BLE001 - unexpected decoder/processor failures are skipped and listed too
        sample_id = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        return Skipped(
            sample_id, "encode_error", f"sample {sample_id!r}: encoding failed ({type(err).__name__}: {err})"
        )


class EncodedDataset(Dataset):
    """Encodes samples inside loader workers; bad samples come back as :class:`Skipped`."""

    def __init__(self, source: RecordSource, encoder: ConversationEncoder):
        self.source, self.encoder = source, encoder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> EncodedSample | Skipped:
        try:
            record, images = self.source.get(index)
        except SampleError as err:  # a source may refuse a record, e.g. an image outside its root
            return Skipped(err.sample_id, err.reason, str(err))
        return encode_or_skip(self.encoder, record, index, images)

    def measures(self, estimator: LengthEstimator) -> list[Measure]:
        """Token length and modality of every sample, from image headers (for length grouping)."""
        out = []
        for index in tqdm(range(len(self)), desc="measure lengths", unit="sample", mininterval=2):
            try:
                record, images = self.source.get(index)
            except SampleError as err:
                out.append(Measure(err.sample_id, reason=err.reason, message=str(err)))
                continue
            out.append(estimator.measure(record, index, images=images))
        return out


class ResumableSampler(Sampler[int]):
    """Endless shuffled index stream (a new permutation each epoch) that starts at a consumed count.

    Global position ``k`` goes to rank ``k % world_size``, so ranks split every batch.
    """

    def __init__(
        self, size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        if size == 0:
            raise ValueError("the data set is empty")
        self.size, self.seed, self.start = size, seed, start
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        epoch, order = position // self.size, self._order(position // self.size)
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self._order(epoch)
            yield order[position % self.size]
            position += self.world_size

    def __len__(self) -> int:
        return self.size


@dataclass
class Batch:
    """A collated micro-batch plus the bookkeeping the loop needs."""

    tensors: dict[str, torch.Tensor]
    num_raw: int
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when every sample of the micro-batch was skipped."""
        return not self.tensors


class Collator:
    """Pads (or, with ``packing``, packs) good samples into a batch and carries the skipped ones."""

    def __init__(self, pad_token_id: int, packing: bool = False, pack_length: int = 0):
        self.pad_token_id, self.packing, self.pack_length = pad_token_id, packing, pack_length

    def __call__(self, items: list[EncodedSample | Skipped]) -> Batch:
        good = [i for i in items if isinstance(i, EncodedSample)]
        skipped = [i for i in items if isinstance(i, Skipped)]
        if not good:
            return Batch({}, len(items), skipped)
        if self.packing:
            return Batch(pack(good, self.pad_token_id, self.pack_length), len(items), skipped)
        return Batch(collate(good, self.pad_token_id), len(items), skipped)
