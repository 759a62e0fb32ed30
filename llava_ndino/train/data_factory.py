"""One data factory for the VLM stages: the data set and the sampler a recipe's ``data`` section asks for.

Sources, in order of precedence: the synthetic shapes set (``data.synthetic.kind``), a stage mixture of
``data_manifests/`` (``data.mixture``), or a LLaVA JSON/JSONL file or shard folder (``data.path``).
Shard folders stream (:class:`ShardStream`); everything else is map-style and may be grouped by
modality and length (``data.group_by_length``).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Sampler

from llava_ndino.config import RunConfig
from llava_ndino.data.dataset import EncodedDataset, JsonRecords, RecordSource, ResumableSampler
from llava_ndino.data.encode import ConversationEncoder
from llava_ndino.data.grouping import GroupedSampler, sample_lengths
from llava_ndino.data.lengths import LengthEstimator
from llava_ndino.data.mixture import map_style_mixture, mixture_parts
from llava_ndino.data.shards import is_shard_dir
from llava_ndino.data.streaming import ShardStream
from llava_ndino.formats.run_dir import DATA_LENGTHS_FILE
from llava_ndino.synthetic.shapes import ShapesRecords

EVAL_SEED_OFFSET = 1_000_003
"""Added to the run's seed for the synthetic evaluation split, so it never repeats a training sample."""


def record_source(cfg: RunConfig, split: str = "train") -> RecordSource:
    """The map-style record source of ``cfg.data``: synthetic shapes, a stage mixture, or a LLaVA JSON file."""
    data = cfg.data
    if data.synthetic.kind == "shapes":
        synthetic = data.synthetic
        count = synthetic.train if split == "train" else synthetic.eval
        seed = cfg.seed if split == "train" else cfg.seed + EVAL_SEED_OFFSET
        return ShapesRecords(count, seed, synthetic.image_size, dialogues=split == "train")
    if data.mixture:
        parts = mixture_parts(data.mixture, data.root)
        return map_style_mixture(parts, data.root, cfg.seed, data.allow_images_outside_root)
    if not data.path:
        raise ValueError(
            "set data.path=FILE (LLaVA JSON/JSONL) or SHARD_DIR, data.mixture=STAGE or data.synthetic.kind=shapes"
        )
    return JsonRecords(Path(data.path))


def _shard_parts(cfg: RunConfig) -> list[tuple[Path, float]] | None:
    """(shard folder, weight) of each part when the data are webdataset shards, else None."""
    data = cfg.data
    if data.synthetic.kind is not None:
        return None
    if data.mixture:
        parts = mixture_parts(data.mixture, data.root)
        if all(is_shard_dir(path) for _, _, path in parts):
            return [(path, weight) for _, weight, path in parts]
        return None
    if data.path and is_shard_dir(Path(data.path)):
        return [(Path(data.path), 1.0)]
    return None


def _allow_outside(cfg: RunConfig) -> bool:
    """Whether the encoder may read images outside data.image_root: when the user allows it, or for a
    mixture, whose records already hold paths checked against each manifest's own image root."""
    return cfg.data.allow_images_outside_root or bool(cfg.data.mixture and cfg.data.synthetic.kind is None)


def _encoding(cfg: RunConfig) -> dict:
    """The settings the encoder and the length estimator share: template, limits, image root, guards."""
    data = cfg.data
    return {
        "template": data.template,
        "max_length": data.max_length,
        "image_root": data.image_root,
        "max_pixels": data.max_pixels,
        "allow_outside_root": _allow_outside(cfg),
        "control_tokens": data.control_tokens,
    }


def vlm_dataset(cfg: RunConfig, processor, split: str = "train") -> Dataset:
    """Map-style encoded data, or a :class:`ShardStream` when the data are webdataset shards."""
    data = cfg.data
    encoder = ConversationEncoder(processor, **_encoding(cfg))
    shards = _shard_parts(cfg)
    if shards is not None:
        return ShardStream(shards, encoder, cfg.seed, cfg.train.per_device_batch_size, data.shuffle_buffer)
    return EncodedDataset(record_source(cfg, split), encoder)


def vlm_sampler(
    cfg: RunConfig, processor, dataset: Dataset, start: int, rank: int, world_size: int
) -> Sampler[int] | None:
    """Shuffled, or grouped by modality and length; None for a :class:`ShardStream`, which positions
    itself (streams shuffle in their buffer and are not length-grouped)."""
    data = cfg.data
    if isinstance(dataset, ShardStream):
        dataset.set_position(start, rank, world_size)
        return None
    if not data.group_by_length:
        return ResumableSampler(len(dataset), cfg.seed, start=start, rank=rank, world_size=world_size)
    estimator = LengthEstimator(processor, **_encoding(cfg))
    key = {
        "data": data.mixture or data.path or data.synthetic.kind,
        "template": data.template,
        "max_length": data.max_length,
        "samples": len(dataset),
    }
    lengths, has_image = sample_lengths(dataset, estimator, Path(cfg.output_dir) / DATA_LENGTHS_FILE, key)
    return GroupedSampler(
        lengths,
        has_image,
        cfg.train.per_device_batch_size,
        cfg.seed,
        start=start,
        rank=rank,
        world_size=world_size,
        window=data.group_window,
    )
